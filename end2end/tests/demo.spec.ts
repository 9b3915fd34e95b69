import { test, expect, type Page } from '@playwright/test';

// The built-in demo's walkthrough (server/demo/README.md, "What the graphs show") in the browser:
// each graph draws the edges the README describes, and its screenshot is saved (JPEG) under
// test-results. Skipped when the server serves another run.

// The walkthrough describes the strongest edges (top-k); the trace view has its own tests.
async function open(page: Page, text: string, pin: string) {
  await page.goto(`/?text=${encodeURIComponent(text)}&pins=${encodeURIComponent(pin)}&trace=off`);
  await expect(page.locator('body')).toHaveAttribute('data-hydrated', 'true');
  await expect(page.locator('canvas.graph')).toHaveAttribute('data-drawn', /^\d+$/);
  await expect(page.locator('.status')).toContainText(/Custom prompt: \d+ tokens/);
}

/** Hovers node `key` (it must belong to a pinned component, so the canvas reports where it is). */
async function hover(page: Page, key: string) {
  const nodes: [string, number, number][] = JSON.parse(
    (await page.locator('canvas.graph').getAttribute('data-probe')) ?? '[]',
  );
  const node = nodes.find(([k]) => k === key);
  expect(node, `${key} is drawn`).toBeDefined();
  await page.locator('canvas.graph').hover({ position: { x: node![1], y: node![2] } });
  const card = page.locator('.card');
  await expect(card).toBeVisible();
  return card;
}

// Tall enough that the hover card fits below the graph.
test.use({ viewport: { width: 1280, height: 900 } });

test.beforeEach(async ({ request }) => {
  const meta = await (await request.get('/api/meta')).json();
  test.skip(!String(meta.wandb_path).endsWith('server/demo/run'), 'the server does not serve the demo');
});

test('demo: attention copies the protagonist\'s name', async ({ page }, testInfo) => {
  await open(page, 'There was a little girl named Mia. She had a big red ball.', 'h.0.attn.v_proj:28');
  const card = await hover(page, 'h.0.attn.v_proj:6:28');
  await expect(card).toContainText('CI');
  // Block 0's value at " Mia" feeds o_proj at the last position, where the next name is predicted.
  await expect(card.locator('.card-edges')).toContainText('h.0.attn.o_proj:14:63');
  await page.screenshot({ path: testInfo.outputPath('name-copy.jpg'), type: 'jpeg', quality: 70 });
});

test('demo: the character\'s gender crosses positions', async ({ page }, testInfo) => {
  await open(page, 'There was a little girl named Mia.', 'h.1.attn.v_proj:79');
  const card = await hover(page, 'h.1.attn.v_proj:4:79');
  await expect(card.locator('.card-edges')).toContainText('h.1.attn.o_proj:6:11');
  await page.screenshot({ path: testInfo.outputPath('gender.jpg'), type: 'jpeg', quality: 70 });
});

test('demo: plural agreement is decided at the noun', async ({ page }, testInfo) => {
  const text = 'There was a little boy named Leo. He had a big red ball. There were three red balls in the park. The balls';
  await open(page, text, 'output:15');
  const card = await hover(page, 'output:25:15');
  await expect(card).toContainText('" were"');
  await expect(card.locator('.card-edges')).toContainText('h.1.mlp.down_proj:25:48');
  await page.screenshot({ path: testInfo.outputPath('plural.jpg'), type: 'jpeg', quality: 70 });
});

test('demo: CI optimised for " Mia" opens an Optimized tab with fewer nodes, kept on reload', async ({ page }, testInfo) => {
  const text = 'There was a little girl named Mia. She had a big red ball.';
  // Alive nodes are compared, so the whole graph is shown rather than a trace.
  await page.goto(`/?text=${encodeURIComponent(text)}&ci=0.01&trace=off`);
  await expect(page.locator('body')).toHaveAttribute('data-hydrated', 'true');
  await expect(page.locator('canvas.graph')).toHaveAttribute('data-drawn', /^\d+$/);
  const status = page.locator('.status');
  await expect(status).toContainText(/Custom prompt: \d+ tokens, \d+ nodes/);
  const nodes = async () => Number(/(\d+) nodes/.exec((await status.textContent()) ?? '')![1]);
  const standard = await nodes();

  // " named" is at position 5; the name follows it.
  await page.locator('#opt-pos').selectOption('5');
  await page.locator('#opt-label-search').fill('mia');
  await page.locator('.optimize .vocab-hit').first().click();
  await expect(page.locator('#opt-label')).toContainText('Mia');
  await page.locator('#opt-steps').fill('60');
  await page.locator('#opt-steps').press('Tab');
  await page.locator('#opt-run').click();
  await expect(page.locator('#tab-optimized')).toHaveClass(/active/);
  await expect(status).toContainText('optimized for', { timeout: 60_000 });
  await expect(status).toContainText('% under the CI mask');
  await expect(status).toContainText(/Custom prompt: 6 tokens/);
  expect(await nodes()).toBeLessThan(standard);
  await expect(page).toHaveURL(/tab=opt/);
  await page.screenshot({ path: testInfo.outputPath('optimized.jpg'), type: 'jpeg', quality: 70 });

  await page.reload();
  await expect(page.locator('body')).toHaveAttribute('data-hydrated', 'true');
  await expect(status).toContainText('optimized for', { timeout: 60_000 });
  await expect(page.locator('#tab-optimized')).toHaveClass(/active/);
  await page.locator('#tab-standard').click();
  await expect(status).not.toContainText('optimized for');
  await expect(status).toContainText(/Custom prompt: 15 tokens/);
});
