import { test, expect, type Page } from '@playwright/test';
import { watchErrors, ready, probe } from './helpers';

// Supernodes: shift-click three nodes, press `g`, name the group; it is drawn as one box with its
// members' edges merged, the URL keeps it, and a click opens it again. Works with any run.

/** Drops a file holding `text` on the page, as a researcher drags an exported view onto it. */
async function dropFile(page: Page, text: string) {
  await page.evaluate((t) => {
    const dt = new DataTransfer();
    dt.items.add(new File([t], 'view.json', { type: 'application/json' }));
    document.querySelector('.app')!.dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
  }, text);
}

async function groupsOnCanvas(page: Page): Promise<[string, number, number][]> {
  return JSON.parse((await page.locator('canvas.graph').getAttribute('data-groups')) ?? '[]');
}

test.use({ viewport: { width: 1280, height: 900 } });

test('three nodes grouped into a labelled supernode survive a reload and open on a click', async ({ page }) => {
  const errors = watchErrors(page);
  await ready(page, '/?trace=off');
  const canvas = page.locator('canvas.graph');
  // Three nodes apart from each other, so each click hits the one meant.
  const nodes: [string, number, number][] = [];
  for (const n of await probe(page)) {
    if (nodes.every((m) => Math.hypot(m[1] - n[1], m[2] - n[2]) > 12)) nodes.push(n);
    if (nodes.length === 3) break;
  }
  expect(nodes.length).toBe(3);
  for (const [, x, y] of nodes) {
    await canvas.click({ position: { x, y }, modifiers: ['Shift'] });
  }
  await expect(page.locator('#group-selection')).toContainText('group the 3 selected');
  const nodesBefore = Number(await canvas.getAttribute('data-nodes'));
  await page.keyboard.press('g');
  await expect.poll(async () => (await groupsOnCanvas(page)).length).toBe(1);
  await expect(canvas).toHaveAttribute('data-nodes', String(nodesBefore - 2));
  await expect(page).toHaveURL(/[?&]g=c%7Cgroup\+1%7C/);
  const label = page.locator('.group .group-label');
  await label.fill('three of a kind');
  await label.press('Enter');
  await expect(page).toHaveURL(/g=c%7Cthree\+of\+a\+kind%7C/);

  // The URL brings the supernode back; its card names it and its members.
  await page.reload();
  await expect(page.locator('body')).toHaveAttribute('data-hydrated', 'true');
  await expect.poll(async () => (await groupsOnCanvas(page)).length).toBe(1);
  await expect(label).toHaveValue('three of a kind');
  const [[, gx, gy]] = await groupsOnCanvas(page);
  await canvas.hover({ position: { x: gx, y: gy } });
  const card = page.locator('.card');
  await expect(card).toContainText('Supernode three of a kind');
  await expect(card).toContainText('3 members');
  for (const [key] of nodes) await expect(card).toContainText(key);
  await page.screenshot({ path: `${__dirname}/../../docs/screenshots/supernode.jpg`, type: 'jpeg', quality: 60 });

  // The exported JSON carries the supernode; dropped on a fresh page it opens the same view.
  const [json] = await Promise.all([page.waitForEvent('download'), page.locator('#export-json').click()]);
  const text = Buffer.concat(await (await json.createReadStream()).toArray()).toString();
  const doc = JSON.parse(text);
  expect(doc.supernodes[0].label).toBe('three of a kind');
  expect(doc.edges.length).toBeGreaterThan(0);
  expect(doc.view).toContain('g=c%7Cthree+of+a+kind%7C');
  await ready(page, '/?prompt=2');
  expect(await groupsOnCanvas(page)).toEqual([]);
  await dropFile(page, text);
  await expect(page).toHaveURL(/g=c%7Cthree\+of\+a\+kind%7C/);
  await expect(page).toHaveURL(/trace=off/);
  await expect.poll(async () => (await groupsOnCanvas(page)).length).toBe(1);
  await dropFile(page, '{"not": "a view"}');
  await expect(page.locator('.status-bar .error')).toContainText('not an exported view');

  // A click opens it: the members are drawn again; Ungroup removes it from the URL.
  const [[, ox, oy]] = await groupsOnCanvas(page);
  await canvas.click({ position: { x: ox, y: oy } });
  await expect.poll(async () => (await groupsOnCanvas(page)).length).toBe(0);
  await expect(canvas).toHaveAttribute('data-nodes', String(nodesBefore));
  await expect(page).toHaveURL(/g=o%7C/);
  await page.locator('.group .ungroup').click();
  await expect(page).not.toHaveURL(/[?&]g=/);
  expect(errors).toEqual([]);
});

test('the pinned subgraph draws the pinned components and the edges among them', async ({ page, request }) => {
  const errors = watchErrors(page);
  const graph = await (await request.get('/api/prompt/1?ci_threshold=0.1&output_prob_threshold=0.05')).json();
  const component = (key: string) => {
    const [layer, , c] = key.split(':');
    return `${layer}:${c}`;
  };
  const inner = graph.edges.find(
    (e: { src: string; tgt: string }) =>
      ![e.src, e.tgt].some((k) => k.startsWith('wte:') || k.startsWith('output:')) &&
      component(e.src) !== component(e.tgt),
  );
  expect(inner, 'an edge between two components').toBeDefined();
  const pins = [component(inner.src), component(inner.tgt)];
  // The strongest edges, as the API sent them (a trace keeps only the edges that carry influence).
  await ready(page, `/?prompt=1&trace=off&pins=${encodeURIComponent(pins.join(','))}`);
  const small = page.locator('canvas.pinned-graph');
  await expect(small).toHaveAttribute('data-drawn', /^[1-9]\d*$/);
  expect(Number(await small.getAttribute('data-nodes'))).toBeGreaterThanOrEqual(2);
  await expect(page.locator('.pinned-summary')).toContainText(/\d+ nodes of the pinned components, [1-9]\d* edges among them/);
  await page.locator('.pins').screenshot({ path: `${__dirname}/../../docs/screenshots/pinned-subgraph.jpg`, type: 'jpeg', quality: 70 });
  expect(errors).toEqual([]);
});

test('a label typed in the hover card (l) is kept and shows after a reload', async ({ page }) => {
  const errors = watchErrors(page);
  await ready(page, '/?trace=off');
  const canvas = page.locator('canvas.graph');
  const [[key, x, y]] = await probe(page);
  const label = `card label ${Date.now()}`;
  await canvas.hover({ position: { x, y } });
  const card = page.locator('.card');
  await expect(card).toContainText(key);
  await page.keyboard.press('l');
  const box = card.locator('.card-label');
  await expect(box).toBeFocused();
  await page.keyboard.type(label);
  await page.keyboard.press('Enter');
  await expect(card.locator('.label')).toHaveText(label);
  await expect(box).toHaveCount(0);
  // Kept by the server: after a reload the card shows it again.
  await page.reload();
  await expect(canvas).toHaveAttribute('data-drawn', /^\d+$/);
  await canvas.hover({ position: { x, y } });
  await expect(card.locator('.label')).toHaveText(label);
  // An empty label removes it.
  await page.keyboard.press('l');
  await box.fill('');
  await box.press('Enter');
  await expect(card.locator('.label')).toHaveCount(0);
  expect(errors).toEqual([]);
});
