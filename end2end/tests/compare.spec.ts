import { test, expect } from '@playwright/test';
import { watchErrors, ready } from './helpers';

// Comparing two prompts: B is graphed with A's parameters, and the panel lists what differs,
// aligned by component and position from the end. The URL keeps both prompts; swapping draws B.

test.use({ viewport: { width: 1280, height: 900 } });

test.describe('the demo', () => {
  test.beforeEach(async ({ request }) => {
    const meta = await (await request.get('/api/meta')).json();
    test.skip(!String(meta.wandb_path).endsWith('server/demo/run'), 'the server does not serve the demo');
  });

  test('Mia against Leo: name components alive in one prompt only, output probabilities, swap', async ({ page }) => {
    const errors = watchErrors(page);
    const a = 'There was a little girl named Mia. She had a big red ball.';
    const b = 'There was a little boy named Leo. He had a big red ball.';
    await ready(page, `/?text=${encodeURIComponent(a)}`);
    await page.locator('#compare-input').fill(b);
    await page.locator('#compare-go').click();
    await expect(page).toHaveURL(/btext=There/);
    const status = page.locator('.compare-status');
    await expect(status).toContainText(/components alive in both, \d+ only in A, \d+ only in B/, { timeout: 30_000 });
    // The names' own components: alive at " Mia" in A, or at " Leo" in B, and not in the other.
    const onlyA = page.locator('#only-a tr.only');
    const onlyB = page.locator('#only-b tr.only');
    const atName =
      (await onlyA.filter({ hasText: '" Mia"' }).count()) + (await onlyB.filter({ hasText: '" Leo"' }).count());
    expect(atName).toBeGreaterThan(0);
    await expect(page.locator('#output-changes tr')).not.toHaveCount(0);
    await expect(page.locator('#edge-changes tr')).not.toHaveCount(0);
    // A row pins its component.
    const first = onlyA.first();
    const component = await first.getAttribute('data-component');
    await first.click();
    await expect(page.locator(`.pin[data-key="${component}"]`)).toBeVisible();
    await page.locator('#compare').screenshot({ path: `${__dirname}/../../docs/screenshots/compare.jpg`, type: 'jpeg', quality: 70 });

    // Both prompts come back with the URL; swapping draws B and compares it with A.
    await page.reload();
    await expect(page.locator('body')).toHaveAttribute('data-hydrated', 'true');
    await expect(status).toContainText('only in B', { timeout: 30_000 });
    await expect(page.locator('#compare-input')).toHaveValue(b);
    await page.locator('#compare-swap').click();
    await expect(page).toHaveURL(/[?&]text=There\+was\+a\+little\+boy/);
    await expect(page).toHaveURL(/btext=There\+was\+a\+little\+girl/);
    await expect(status).toContainText('only in B', { timeout: 30_000 });
    await page.locator('#compare-close').click();
    await expect(page).not.toHaveURL(/btext=/);
    expect(errors).toEqual([]);
  });
});
