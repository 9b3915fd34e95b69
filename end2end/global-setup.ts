import { baseURL } from './playwright.config';

// cargo-leptos spawns the server and starts Playwright at once; wait for the first answer.
export default async function waitForServer(): Promise<void> {
  // The first start of the demo also indexes the demo corpus (about a minute on two cores).
  const deadline = Date.now() + 600_000;
  let last = '';
  while (Date.now() < deadline) {
    try {
      const res = await fetch(baseURL);
      if (res.ok) return;
      last = `HTTP ${res.status}`;
    } catch (e) {
      last = String(e);
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`server at ${baseURL} did not answer within 600 s (last: ${last})`);
}
