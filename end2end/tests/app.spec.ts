import { test, expect, type ConsoleMessage } from '@playwright/test';

test('the page hydrates and draws the graph', async ({ page }, testInfo) => {
  const errors: string[] = [];
  page.on('console', (msg: ConsoleMessage) => {
    if (msg.type() === 'error') errors.push(msg.text());
  });
  page.on('pageerror', (err) => errors.push(err.message));

  await page.goto('/');
  await expect(page).toHaveTitle('SPD local attributions');
  await expect(page.locator('h1')).toHaveText('SPD local attributions');

  // Set by an effect, which only runs once the wasm has hydrated the page.
  await expect(page.locator('body')).toHaveAttribute('data-hydrated', 'true');
  await expect(page.locator('.status')).toContainText(/Prompt 0: 8 tokens, \d+ nodes, \d+ edges/);

  const canvas = page.locator('canvas.graph');
  await expect(canvas).toHaveAttribute('data-drawn', /^[1-9]\d*$/);
  const drawn = Number(await canvas.getAttribute('data-drawn'));
  expect(drawn).toBeGreaterThan(0);

  const pixels = await canvas.evaluate((el: HTMLCanvasElement) => {
    const ctx = el.getContext('2d')!;
    const { data } = ctx.getImageData(0, 0, el.width, el.height);
    const [r0, g0, b0] = [data[0], data[1], data[2]];
    let differing = 0;
    let blue = 0;
    let red = 0;
    for (let i = 0; i < data.length; i += 4) {
      const [r, g, b] = [data[i], data[i + 1], data[i + 2]];
      if (r !== r0 || g !== g0 || b !== b0) differing++;
      if (b > r + 60 && b > g + 30) blue++;
      if (r > g + 60 && r > b + 60) red++;
    }
    const cssWidth = el.clientWidth;
    return { differing, blue, red, width: el.width, cssWidth, dpr: window.devicePixelRatio };
  });
  expect(pixels.differing).toBeGreaterThan(1000);
  // Edges are coloured by sign: the graph of the served run has both.
  expect(pixels.blue).toBeGreaterThan(50);
  expect(pixels.red).toBeGreaterThan(50);
  // HiDPI: the backing store is devicePixelRatio times the CSS size.
  expect(pixels.dpr).toBe(2);
  expect(Math.abs(pixels.width - pixels.cssWidth * pixels.dpr)).toBeLessThanOrEqual(2);

  await page.screenshot({ path: testInfo.outputPath('page.png'), fullPage: true });
  expect(errors).toEqual([]);
});
