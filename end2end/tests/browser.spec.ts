import { test, expect } from '@playwright/test';
import { watchErrors, ready } from './helpers';

// The component browser: a layer's components ranked with a rank plot, a jump to `layer:c`, and
// the probe box's per-token CI. The demo's name-copying value component fires on the name.

test.use({ viewport: { width: 1280, height: 900 } });

test('the browser ranks a layer, jumps to a component and probes a text', async ({ page, request }) => {
  const errors = watchErrors(page);
  await ready(page);
  const plot = page.locator('.rank-plot');
  await expect(plot).toHaveAttribute('data-points', /^[1-9]\d*$/);
  const rows = page.locator('.browser-row');
  await expect(rows.first()).toBeVisible();
  const options = await page.locator('#browser-layer option').allTextContents();
  expect(options.length).toBeGreaterThan(1);
  // Another layer, another order, the linear scale: the list follows.
  await page.locator('#browser-layer').selectOption(options[1]);
  await expect(rows.first()).toHaveAttribute('data-key', new RegExp(`^${options[1].replace(/\./g, '\\.')}:`));
  await page.locator('#browser-sort').selectOption('density');
  await page.locator('#browser-log').uncheck();
  await rows.first().click();
  await expect(page.locator('.browser-focus')).toContainText(/rank 1 of \d+/);

  const meta = await (await request.get('/api/meta')).json();
  const demo = String(meta.wandb_path).endsWith('server/demo/run');
  const key = demo ? 'h.0.attn.v_proj:28' : (await rows.first().getAttribute('data-key'))!;
  await page.locator('#browser-jump').fill(key);
  await page.locator('#browser-jump').press('Enter');
  await expect(page.locator('#browser-layer')).toHaveValue(key.split(':')[0]);
  await expect(page.locator('.browser-focus')).toContainText(new RegExp(`${key.replace(/\./g, '\\.')}.*: rank \\d+ of`));
  await page.locator('#probe-text').fill('There was a little girl named Mia. She had a big red ball.');
  await page.locator('#probe-go').click();
  const tokens = page.locator('.probe-tokens .tok');
  await expect(tokens).not.toHaveCount(0);
  if (demo) {
    const mia = tokens.filter({ hasText: /^ Mia$/ });
    expect(Number(await mia.getAttribute('data-ci'))).toBeGreaterThan(0.1);
  }
  await page.locator('#browser').screenshot({ path: `${__dirname}/../../docs/screenshots/browser.jpg`, type: 'jpeg', quality: 70 });
  expect(errors).toEqual([]);
});
