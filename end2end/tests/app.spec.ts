import { test, expect, type Page } from '@playwright/test';
import { watchErrors as watch, ready, drawn, probe } from './helpers';

// A failed graph request (the unknown-prompt test) logs its 404; that is expected here.
const watchErrors = (page: Page) => watch(page, true);

// These tests run against whatever run the server serves (the built-in demo by default): they read
// node positions from the canvas's data-probe attribute and prompt texts from the picker.

test('the page hydrates and draws the graph', async ({ page }, testInfo) => {
  const errors = watchErrors(page);
  await ready(page);
  await expect(page).toHaveTitle('SPD local attributions');
  // A new user sees the trace of the last position's outputs.
  await expect(page.locator('.status')).toContainText(/Prompt 1: \d+ tokens, \d+ nodes \(of \d+\), \d+ edges \(of \d+\) · trace of the last position, completeness \d/);
  expect(await drawn(page)).toBeGreaterThan(0);

  const canvas = page.locator('canvas.graph');
  const pixels = await canvas.evaluate((el: HTMLCanvasElement) => {
    const ctx = el.getContext('2d')!;
    const { data } = ctx.getImageData(0, 0, el.width, el.height);
    let differing = 0;
    let blue = 0;
    let red = 0;
    for (let i = 0; i < data.length; i += 4) {
      const [r, g, b] = [data[i], data[i + 1], data[i + 2]];
      if (r !== 255 || g !== 255 || b !== 255) differing++;
      if (b > r + 60 && b > g + 30) blue++;
      if (r > g + 60 && r > b + 60) red++;
    }
    return { differing, blue, red, width: el.width, cssWidth: el.clientWidth, dpr: window.devicePixelRatio };
  });
  expect(pixels.differing).toBeGreaterThan(1000);
  // Edges are coloured by sign.
  expect(pixels.blue).toBeGreaterThan(50);
  expect(pixels.red).toBeGreaterThan(50);
  // HiDPI: the backing store is devicePixelRatio times the CSS size.
  expect(pixels.dpr).toBe(2);
  expect(Math.abs(pixels.width - pixels.cssWidth * pixels.dpr)).toBeLessThanOrEqual(2);
  // The picker lists stored prompts.
  await expect(page.locator('.prompt-item').first()).toBeVisible();
  await page.screenshot({ path: testInfo.outputPath('graph.png'), fullPage: true });
  expect(errors).toEqual([]);
});

test('hover shows a card, click pins, and search finds prompts with the pin', async ({ page }, testInfo) => {
  const errors = watchErrors(page);
  await ready(page);
  const canvas = page.locator('canvas.graph');
  const nodes = await probe(page);
  expect(nodes.length).toBeGreaterThan(0);
  const [key, x, y] = nodes[0];
  await canvas.hover({ position: { x, y } });
  const card = page.locator('.card');
  await expect(card).toBeVisible();
  await expect(card).toContainText(key);
  await expect(card).toContainText('CI');
  await expect(card).toContainText('strongest in');
  // Activation contexts arrive from the database.
  await expect(card.locator('.example').first()).toBeVisible();
  await page.screenshot({ path: testInfo.outputPath('hover.png'), fullPage: true });

  await canvas.click({ position: { x, y } });
  const component = key.replace(/:\d+:(\d+)$/, ':$1');
  await expect(page.locator(`.pin[data-key="${component}"]`)).toBeVisible();
  await expect(page).toHaveURL(new RegExp(`pins=${component.replace(/\./g, '\\.')}`));

  await page.locator('#find-all').click();
  await expect(page.locator('.search-count')).toContainText(/[1-9]\d* matching prompts/);
  // Every listed prompt has the component alive somewhere…
  const listed = page.locator('.result');
  expect(await listed.count()).toBeGreaterThan(0);
  for (const text of await listed.locator('.mono').allTextContents()) {
    expect(text).toContain(`${component} @ [`);
  }
  // …and the prompt it was pinned on is among all matches (the page lists the 50 strongest).
  const api = await (await page.request.get(`/api/search?components=${component}&mode=all`)).json();
  expect(api.results.map((r: { id: number }) => r.id)).toContain(1);
  await page.screenshot({ path: testInfo.outputPath('pinned-search.png'), fullPage: true });

  // Loading another result keeps the pin.
  const other = listed.last();
  const otherId = await other.getAttribute('data-id');
  await other.click();
  await expect(page.locator('.status')).toContainText(`Prompt ${otherId}:`);
  await expect(page.locator(`.pin[data-key="${component}"]`)).toBeVisible();
  expect(errors).toEqual([]);
});

test('changing top-k changes the edge count', async ({ page }) => {
  await ready(page, '/?trace=off');
  await expect(page.locator('.status')).toContainText(/Prompt 1: \d+ tokens, \d+ nodes, \d+ of \d+ edges shown/);
  const before = await drawn(page);
  expect(before).toBeGreaterThan(20);
  await page.locator('#top-k').fill('10');
  await page.locator('#top-k').press('Enter');
  await expect(page.locator('canvas.graph')).toHaveAttribute('data-drawn', '10');
  await expect(page.locator('.status')).toContainText('10 of');
  await expect(page).toHaveURL(/topk=10/);
});

test('a custom prompt produces a graph', async ({ page }, testInfo) => {
  const errors = watchErrors(page);
  await ready(page);
  const text = (await page.locator('.prompt-item .ptext').nth(1).textContent()) ?? '';
  const words = text.trim().split(/\s+/).slice(0, 8).join(' ');
  expect(words.length).toBeGreaterThan(0);
  await page.locator('#custom-text').fill(words);
  await page.locator('#custom-go').click();
  await expect(page.locator('.status')).toContainText(/Custom prompt: \d+ tokens, \d+ nodes/);
  await expect(page).toHaveURL(/text=/);
  expect(await drawn(page)).toBeGreaterThan(0);
  await page.screenshot({ path: testInfo.outputPath('custom.png'), fullPage: true });
  expect(errors).toEqual([]);
});

test('reloading the URL restores the view', async ({ page }) => {
  await ready(page);
  const [key] = (await probe(page))[0];
  const component = key.replace(/:\d+:(\d+)$/, ':$1');
  const url = `/?prompt=2&pins=${component}&topk=25&layout=importance&norm=0&trace=off`;
  await ready(page, url);
  await page.reload();
  await expect(page.locator('body')).toHaveAttribute('data-hydrated', 'true');
  await expect(page.locator('.status')).toContainText('Prompt 2:');
  await expect(page.locator('canvas.graph')).toHaveAttribute('data-drawn', /^([0-9]|1[0-9]|2[0-5])$/);
  await expect(page.locator('#layout')).toHaveValue('importance');
  await expect(page.locator('#normalize')).toHaveValue('none');
  await expect(page.locator(`.pin[data-key="${component}"]`)).toBeVisible();
  await expect(page).toHaveURL(/prompt=2/);
});

test('an unknown prompt id shows an error with retry', async ({ page }, testInfo) => {
  await page.goto('/?prompt=987654321');
  await expect(page.locator('body')).toHaveAttribute('data-hydrated', 'true');
  const error = page.locator('.status-bar .error');
  await expect(error).toContainText('Prompt 987654321 not found');
  await page.screenshot({ path: testInfo.outputPath('error.png'), fullPage: true });
  await page.locator('.retry').click();
  await expect(error).toContainText('not found');
  // Picking a stored prompt recovers.
  await page.locator('.prompt-item').first().click();
  await expect(page.locator('.status')).toContainText('Prompt 1:');
  await expect(error).toHaveCount(0);
});

test('keyboard shortcuts: / focuses search, f fits, Esc clears pins', async ({ page }) => {
  await ready(page);
  const initial = await probe(page);
  // Zooming, fitting and pinning change only the view: none of them may fetch the graph again.
  let graphRequests = 0;
  page.on('request', (r) => {
    if (r.url().includes('/fn/get_graph')) graphRequests += 1;
  });
  await page.locator('h1').click();
  await page.keyboard.press('/');
  await expect(page.locator('#prompt-search')).toBeFocused();
  await page.locator('h1').click();

  const canvas = page.locator('canvas.graph');
  const box = (await canvas.boundingBox())!;
  await page.mouse.move(box.x + box.width / 2, box.y + 100);
  await page.mouse.wheel(0, -400);
  await expect(page).toHaveURL(/view=/);
  // The canvas repaints (and rewrites its probe) after the URL changes: wait for the paint.
  await expect.poll(() => probe(page)).not.toEqual(initial);
  await page.keyboard.press('f');
  await expect(page).not.toHaveURL(/view=/);
  // Fitting restores the first view.
  await expect.poll(() => probe(page)).toEqual(initial);

  const [, x, y] = (await probe(page))[0];
  await canvas.click({ position: { x, y } });
  await expect(page.locator('.pin')).toHaveCount(1);
  await page.keyboard.press('Escape');
  await expect(page.locator('.pin')).toHaveCount(0);
  expect(graphRequests).toBe(0);
});

test('the graph exports as JSON and PNG', async ({ page }) => {
  await ready(page);
  const [json] = await Promise.all([page.waitForEvent('download'), page.locator('#export-json').click()]);
  expect(json.suggestedFilename()).toBe('graph-prompt-1.json');
  const graph = JSON.parse(await (await json.createReadStream()).toArray().then((c) => Buffer.concat(c).toString()));
  expect(graph.prompt_id).toBe(1);
  expect(graph.edges.length).toBeGreaterThan(0);
  const [png] = await Promise.all([page.waitForEvent('download'), page.locator('#export-png').click()]);
  expect(png.suggestedFilename()).toBe('graph.png');
  const bytes = Buffer.concat(await (await png.createReadStream()).toArray());
  expect(bytes.subarray(1, 4).toString()).toBe('PNG');
});

async function exported(page: Page): Promise<any> {
  const [json] = await Promise.all([page.waitForEvent('download'), page.locator('#export-json').click()]);
  return JSON.parse(await (await json.createReadStream()).toArray().then((c) => Buffer.concat(c).toString()));
}

test("SPD's app semantics with L2 per target: values change, the status says so, reload keeps it", async ({ page }, testInfo) => {
  const errors = watchErrors(page);
  // The strongest edges, so whole groups of a target's incoming edges are drawn.
  await ready(page, '/?prompt=2&trace=off');
  await expect(page.locator('.status')).toContainText('seed semantics, l1 normalized');
  const seed = await exported(page);
  await page.locator('#semantics').selectOption('app');
  await page.locator('#normalize').selectOption('l2-target');
  await expect(page.locator('.status')).toContainText('app semantics, l2-target normalized', { timeout: 60_000 });
  await expect(page).toHaveURL(/sem=app/);
  await expect(page).toHaveURL(/norm=l2-target/);
  const app = await exported(page);
  expect(app.params.semantics).toBe('app');
  // Each target's incoming edges have unit L2 norm before the 30,000-edge cap: what is drawn of a
  // group has norm at most 1, and whole groups exactly 1.
  const norms = [...app.edges.reduce((m: Map<string, number>, e: any) =>
    m.set(e.tgt, (m.get(e.tgt) ?? 0) + e.val * e.val), new Map<string, number>()).values()] as number[];
  expect(norms.every((n) => n <= 1 + 1e-3)).toBe(true);
  expect(norms.filter((n) => Math.abs(n - 1) < 1e-3).length).toBeGreaterThan(norms.length / 2);
  const seedVals = new Map<string, number>(seed.edges.map((e: any) => [`${e.src}>${e.tgt}`, e.val]));
  const changed = app.edges.filter((e: any) => {
    const v = seedVals.get(`${e.src}>${e.tgt}`);
    return v !== undefined && Math.abs(v - e.val) > 1e-3;
  });
  expect(changed.length).toBeGreaterThan(0);
  await page.screenshot({ path: testInfo.outputPath('app-semantics.png'), fullPage: true });
  await page.reload();
  await expect(page.locator('body')).toHaveAttribute('data-hydrated', 'true');
  await expect(page.locator('#semantics')).toHaveValue('app');
  await expect(page.locator('#normalize')).toHaveValue('l2-target');
  await expect(page.locator('.status')).toContainText('app semantics, l2-target normalized', { timeout: 60_000 });
  expect(errors).toEqual([]);
});

test('a label typed for a pinned component is kept by the server and shows in the card', async ({ page }) => {
  const errors = watchErrors(page);
  await ready(page);
  const [key, x, y] = (await probe(page))[0];
  const component = key.replace(/:\d+:(\d+)$/, ':$1');
  const canvas = page.locator('canvas.graph');
  await canvas.click({ position: { x, y } });
  const input = page.locator(`.pin[data-key="${component}"] .label-input`);
  const label = `test label ${Date.now()}`;
  await input.fill(label);
  const saved = page.waitForResponse((r) => r.url().includes('/fn/set_label') && r.ok());
  await input.press('Enter');
  await saved;
  await page.reload();
  await expect(page.locator('body')).toHaveAttribute('data-hydrated', 'true');
  await expect(page.locator(`.pin[data-key="${component}"] .label-input`)).toHaveValue(label);
  await canvas.hover({ position: { x, y } });
  await expect(page.locator('.card .label')).toHaveText(label);
  // Cleared again, so other runs of the suite start without it.
  await page.locator(`.pin[data-key="${component}"] .label-input`).fill('');
  await page.locator(`.pin[data-key="${component}"] .label-input`).press('Enter');
  expect(errors).toEqual([]);
});
