import { expect, type Page, type ConsoleMessage } from '@playwright/test';

// What every spec needs: console errors collected, a page opened until hydrated and drawn, and the
// canvas's test attributes read back.

/** Console errors and uncaught exceptions of `page`; with `allow404`, failed requests that logged a
 * 404 (expected where a test asks for something missing) are not counted. */
export function watchErrors(page: Page, allow404 = false): string[] {
  const errors: string[] = [];
  page.on('console', (msg: ConsoleMessage) => {
    if (msg.type() === 'error' && !(allow404 && msg.text().includes('404'))) errors.push(msg.text());
  });
  page.on('pageerror', (err) => errors.push(err.message));
  return errors;
}

/** Opens `url` and waits until the page is hydrated and the canvas has drawn a graph. */
export async function ready(page: Page, url = '/') {
  await page.goto(url);
  await expect(page.locator('body')).toHaveAttribute('data-hydrated', 'true');
  await expect(page.locator('canvas.graph')).toHaveAttribute('data-drawn', /^\d+$/);
}

/** How many edges the canvas drew. */
export async function drawn(page: Page): Promise<number> {
  return Number(await page.locator('canvas.graph').getAttribute('data-drawn'));
}

/** Component nodes on screen: [key, x, y] in CSS pixels of the canvas. */
export async function probe(page: Page): Promise<[string, number, number][]> {
  return JSON.parse((await page.locator('canvas.graph').getAttribute('data-probe')) ?? '[]');
}
