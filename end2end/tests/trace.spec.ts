import { test, expect, type Page } from '@playwright/test';
import { watchErrors, ready, drawn } from './helpers';

// Tracing what drives an output: the default view prunes the graph to the nodes and edges that
// carry the last position's influence; sliders prune further on the client, clicking an output
// traces it, and `A - B` traces a logit difference. The first tests work with any run; the last
// follows the demo README's name-copying circuit.

/** "N nodes (of M)" of the status line. */
async function nodeCounts(page: Page): Promise<[number, number]> {
  const text = (await page.locator('.status').textContent()) ?? '';
  const m = /(\d+) nodes \(of (\d+)\)/.exec(text);
  expect(m, text).not.toBeNull();
  return [Number(m![1]), Number(m![2])];
}

async function slide(page: Page, id: string, value: number) {
  await page.locator(`#${id}`).evaluate((el: HTMLInputElement, v: number) => {
    el.value = String(v);
    el.dispatchEvent(new Event('input', { bubbles: true }));
  }, value);
}

test.use({ viewport: { width: 1280, height: 900 } });

test('the default view traces the last position; sliders prune it without a new request', async ({ page }, testInfo) => {
  const errors = watchErrors(page);
  await ready(page);
  const status = page.locator('.status');
  await expect(status).toContainText('trace of the last position, completeness');
  const [kept, all] = await nodeCounts(page);
  expect(kept).toBeLessThan(all);
  await expect(page.locator('#draw-mode')).toHaveValue('trace');
  let graphRequests = 0;
  page.on('request', (r) => {
    if (r.url().includes('/fn/get_graph')) graphRequests += 1;
  });
  await slide(page, 'edge-threshold', 0.99);
  await slide(page, 'node-threshold', 0.99);
  await expect(page).toHaveURL(/tn=0\.99/);
  const many = await drawn(page);
  await slide(page, 'edge-threshold', 0.5);
  await expect(page).toHaveURL(/te=0\.5/);
  await expect.poll(() => drawn(page)).toBeLessThan(many);
  await slide(page, 'node-threshold', 0.5);
  await expect.poll(async () => (await nodeCounts(page))[0]).toBeLessThan(kept);
  expect(graphRequests).toBe(0);
  await page.screenshot({ path: testInfo.outputPath('trace.png'), fullPage: true });
  // The thresholds come back with the URL.
  await page.reload();
  await expect(page.locator('body')).toHaveAttribute('data-hydrated', 'true');
  await expect(page.locator('#node-threshold-value')).toHaveText('0.50');
  await expect(page.locator('#edge-threshold-value')).toHaveText('0.50');
  expect(errors).toEqual([]);
});

test('clicking an output traces it; the strongest edges are one choice away', async ({ page }) => {
  const errors = watchErrors(page);
  await ready(page);
  const outputs: [string, number, number][] = JSON.parse(
    (await page.locator('canvas.graph').getAttribute('data-outputs')) ?? '[]',
  );
  expect(outputs.length).toBeGreaterThan(0);
  const [key, x, y] = outputs[0];
  const [, pos, token] = key.split(':');
  await page.locator('canvas.graph').click({ position: { x, y } });
  await expect(page).toHaveURL(new RegExp(`trace=${pos}:${token}`));
  await expect(page.locator('.status')).toContainText(new RegExp(`trace of .* at ${pos}, completeness`), { timeout: 30_000 });
  await expect(page.locator('#trace-target')).toContainText(` at ${pos}`);
  await page.locator('#draw-mode').selectOption('strongest');
  await expect(page).toHaveURL(/trace=off/);
  await expect(page.locator('.status')).toContainText(/\d+ of \d+ edges shown/);
  await page.locator('#trace-last').click();
  await expect(page.locator('.status')).toContainText('trace of the last position');
  expect(errors).toEqual([]);
});

test.describe('the demo', () => {
  test.beforeEach(async ({ request }) => {
    const meta = await (await request.get('/api/meta')).json();
    test.skip(!String(meta.wandb_path).endsWith('server/demo/run'), 'the server does not serve the demo');
  });

  test('the trace of the Mia prompt keeps the name-copying edge; Mia - Leo traces a difference', async ({ page }, testInfo) => {
    const errors = watchErrors(page);
    const text = 'There was a little girl named Mia. She had a big red ball.';
    await ready(page, `/?text=${encodeURIComponent(text)}&pins=${encodeURIComponent('h.0.attn.v_proj:28')}`);
    await expect(page.locator('header')).toContainText('run ·');
    const [kept, all] = await nodeCounts(page);
    expect(kept).toBeLessThan(all);
    const nodes: [string, number, number][] = JSON.parse(
      (await page.locator('canvas.graph').getAttribute('data-probe')) ?? '[]',
    );
    const mia = nodes.find(([k]) => k === 'h.0.attn.v_proj:6:28');
    expect(mia, 'the value at " Mia" is in the trace').toBeDefined();
    await page.locator('canvas.graph').hover({ position: { x: mia![1], y: mia![2] } });
    const card = page.locator('.card');
    await expect(card).toContainText('influence on the trace');
    // The value at " Mia" feeds o_proj at the last position, where the name is predicted.
    await expect(card.locator('.card-edges')).toContainText(/strongest out.*h\.0\.attn\.o_proj:14:/);
    await page.screenshot({ path: testInfo.outputPath('trace-mia.jpg'), type: 'jpeg', quality: 70 });
    // The README's picture of the trace view.
    await page.screenshot({ path: `${__dirname}/../../docs/screenshots/trace-mia.jpg`, type: 'jpeg', quality: 60 });

    await page.locator('#trace-diff').fill('Mia - Leo');
    await page.locator('#trace-diff-go').click();
    await expect(page).toHaveURL(/trace=14:\d+-\d+/);
    await expect(page.locator('.status')).toContainText(/trace of "[^"]*Mia" − "[^"]*Leo" at 14/, { timeout: 30_000 });
    expect(errors).toEqual([]);
  });
});
