import { test, expect, type Page } from '@playwright/test';
import { ready, drawn } from './helpers';

// Time per frame of the main canvas, as the page measures its own painting with the Performance
// API (`data-paint-ms`): a view of the strongest 10,000 edges and the default trace view, each
// redrawn 30 times by zooming. Figures go to the test's output (the goal is < 16 ms a frame);
// nothing here asserts a time.

async function frames(page: Page, n: number): Promise<number[]> {
  const canvas = page.locator('canvas.graph');
  const box = (await canvas.boundingBox())!;
  await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
  const times: number[] = [];
  for (let i = 0; i < n; i++) {
    await page.mouse.wheel(0, i % 2 === 0 ? -60 : 60);
    // The redraw runs in an effect of the wheel's handler: after a frame it has happened.
    await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => r(null))));
    times.push(Number(await canvas.getAttribute('data-paint-ms')));
  }
  return times;
}

function report(what: string, edges: number, times: number[]) {
  const sorted = [...times].sort((a, b) => a - b);
  const median = sorted[Math.floor(sorted.length / 2)];
  const line = `${what}: ${edges} edges, paint median ${median.toFixed(2)} ms, max ${sorted[sorted.length - 1].toFixed(2)} ms over ${times.length} frames`;
  console.log(line);
  test.info().annotations.push({ type: 'frame time', description: line });
}

test.use({ viewport: { width: 1280, height: 900 } });

test('redraw time per frame: 10,000 strongest edges and the trace view', async ({ page }) => {
  test.setTimeout(120_000);
  await ready(page, '/?trace=off&topk=10000&ci=0.01');
  const many = await drawn(page);
  expect(many).toBeGreaterThan(0);
  report('strongest', many, await frames(page, 30));
  await ready(page, '/');
  report('trace', await drawn(page), await frames(page, 30));
});
