import { test, expect, type Page } from '@playwright/test';
import { watchErrors, ready, probe } from './helpers';

// Testing a circuit from the page: select nodes with a shift-drag box, keep only them, fork a token,
// and find the runs again after a reload (the server keeps them in its notes file). Works with any
// run; the history may hold runs of earlier test runs, so counts are relative.

async function selectedCount(page: Page): Promise<number> {
  const text = (await page.locator('#selected-count').textContent()) ?? '';
  return Number(text.split(' ')[0]);
}

test('a box selects nodes, keep-only runs them, a fork is a second run, reload keeps both', async ({ page }, testInfo) => {
  const errors = watchErrors(page);
  await ready(page);
  const canvas = page.locator('canvas.graph');
  const nodes = (await probe(page)).slice(0, 3);
  expect(nodes.length).toBe(3);
  const box = (await canvas.boundingBox())!;
  const xs = nodes.map((n) => n[1]);
  const ys = nodes.map((n) => n[2]);
  await page.keyboard.down('Shift');
  await page.mouse.move(box.x + Math.min(...xs) - 4, box.y + Math.min(...ys) - 4);
  await page.mouse.down();
  await page.mouse.move(box.x + Math.max(...xs) + 4, box.y + Math.max(...ys) + 4, { steps: 6 });
  await page.mouse.up();
  await page.keyboard.up('Shift');
  await expect.poll(() => selectedCount(page)).toBeGreaterThanOrEqual(3);
  const selected = JSON.parse((await canvas.getAttribute('data-selected')) ?? '[]');
  for (const [key] of nodes) {
    expect(selected.map((s: [string]) => s[0])).toContain(key);
  }
  await expect(page).toHaveURL(/sel=/);

  const runs = page.locator('.iv-run');
  const before = await runs.count();
  await page.locator('#iv-run').click();
  await expect(runs).toHaveCount(before + 1);
  const table = page.locator('.iv-table');
  await expect(table).toBeVisible();
  await expect(table.locator('caption')).toContainText('keep of');
  await expect(table.locator('.p-iv').first()).toContainText('%');
  await page.screenshot({ path: testInfo.outputPath('keep-only.png'), fullPage: true });

  // Fork: swap the token at position 1 for one found in the vocabulary.
  await page.locator('.fork summary').click();
  await page.locator('#fork-pos').selectOption('1');
  await page.locator('#fork-token').fill('a');
  await page.locator('.vocab-hit').first().click();
  await expect(page.locator('.swap')).toHaveCount(1);
  await page.locator('#fork-run').click();
  await expect(runs).toHaveCount(before + 2);
  await expect(runs.last()).toContainText('fork of 1 token');

  // The history and the selection survive a reload.
  await page.reload();
  await expect(page.locator('body')).toHaveAttribute('data-hydrated', 'true');
  await expect(runs).toHaveCount(before + 2);
  await expect.poll(() => selectedCount(page)).toBeGreaterThanOrEqual(3);
  // Deleting a run removes it for good.
  await runs.last().locator('.iv-delete').click();
  await expect(runs).toHaveCount(before + 1);
  await page.reload();
  await expect(page.locator('body')).toHaveAttribute('data-hydrated', 'true');
  await expect(runs).toHaveCount(before + 1);

  // Shift-click toggles one node; Escape clears the selection.
  await ready(page, '/?prompt=1');
  const [key, x, y] = (await probe(page))[0];
  await canvas.click({ position: { x, y }, modifiers: ['Shift'] });
  await expect.poll(() => selectedCount(page)).toBe(1);
  expect((await canvas.getAttribute('data-selected')) ?? '').toContain(key);
  // `i` runs the panel from the keyboard.
  const n = await runs.count();
  await page.keyboard.press('i');
  await expect(runs).toHaveCount(n + 1);
  await expect(runs.last()).toContainText('keep 1 node');
  await runs.last().locator('.iv-delete').click();
  await expect(runs).toHaveCount(n);
  await page.keyboard.press('Escape');
  await expect.poll(() => selectedCount(page)).toBe(0);
  expect(errors).toEqual([]);
});
