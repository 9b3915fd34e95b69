import { test, expect, type Page } from '@playwright/test';
import { probe } from './helpers';
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';

// What the sidecar file keeps across a restart: a graph computed before comes back from disk
// (the API says so in `x-graph-cache`), and a label typed in the hover card is still there. The test starts a
// second server of its own on another port, over the same demo database and sidecar, stops it and
// starts it again.

const root = path.resolve(__dirname, '../..');
const port = 3017;
const base = `http://127.0.0.1:${port}`;

async function start(): Promise<ChildProcess> {
  const child = spawn(path.join(root, 'target/debug/server'), ['--addr', `127.0.0.1:${port}`], {
    cwd: root,
    env: { ...process.env, LEPTOS_OUTPUT_NAME: 'spd-explorer', LEPTOS_SITE_ROOT: 'target/site', RUST_LOG: 'warn' },
    stdio: ['ignore', 'ignore', 'inherit'],
  });
  const deadline = Date.now() + 120_000;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`the server exited with ${child.exitCode}`);
    try {
      if ((await fetch(`${base}/api/meta`)).ok) return child;
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  child.kill('SIGKILL');
  throw new Error('the second server did not answer within 120 s');
}

async function stop(child: ChildProcess) {
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  await exited;
}

/** Opens the second server's strongest-edges view and hovers its first component node; the card. */
async function hoverFirst(page: Page) {
  await page.goto(`${base}/?trace=off`);
  await expect(page.locator('body')).toHaveAttribute('data-hydrated', 'true');
  const canvas = page.locator('canvas.graph');
  await expect(canvas).toHaveAttribute('data-drawn', /^\d+$/);
  const [[key, x, y]] = await probe(page);
  await canvas.hover({ position: { x, y } });
  const card = page.locator('.card');
  await expect(card).toContainText(key);
  return card;
}

/** Types `label` in the hover card of the first node (`l`) and waits until the server kept it. */
async function typeInCard(page: Page, label: string) {
  const card = await hoverFirst(page);
  const kept = page.waitForResponse((r) => r.url().includes('/fn/set_label') && r.ok());
  await page.keyboard.press('l');
  await card.locator('.card-label').fill(label);
  await card.locator('.card-label').press('Enter');
  await kept;
}

test('a restarted server serves a graph from the sidecar and keeps the labels', async ({ page }) => {
  test.setTimeout(300_000);
  // A threshold no other request used, so the first start computes this graph.
  const ci = (0.1 + Math.floor(Math.random() * 10_000) / 1e6).toFixed(6);
  const url = `${base}/api/prompt/2?ci_threshold=${ci}`;
  let server = await start();
  try {
    const first = await fetch(url);
    expect(first.status).toBe(200);
    expect(first.headers.get('x-graph-cache')).toBe('computed');
    const computed = await first.text();
    expect((await fetch(url)).headers.get('x-graph-cache')).toBe('memory');
    const label = `restart label ${ci}`;
    await typeInCard(page, label);
    // The worker writes the graph to the sidecar just after answering.
    await new Promise((r) => setTimeout(r, 2_000));
    await stop(server);

    server = await start();
    const again = await fetch(url);
    expect(again.headers.get('x-graph-cache')).toBe('disk');
    expect(await again.text()).toBe(computed);
    await expect((await hoverFirst(page)).locator('.label')).toHaveText(label);
    await typeInCard(page, '');
  } finally {
    await stop(server);
  }
});
