"""6 · Learn: memorization and the method in a few illustrated steps, each linked to the
control that shows it."""
from __future__ import annotations

import gradio as gr
import numpy as np

from iet_core.history import RatioSnapshot
from pages import charts, common

TITLE, PATH = "6 · Learn", "learn"

NEAREST_SVG = """
<svg viewBox="0 0 420 190" width="420" role="img" aria-label="A sample much closer to one training image than to the next">
  <style>text{font:14px sans-serif}</style>
  <circle cx="80" cy="95" r="12" fill="#dc2626"/><text x="50" y="130">generated</text>
  <rect x="108" y="83" width="24" height="24" fill="#4f46e5"/><text x="100" y="62">nearest</text>
  <rect x="340" y="60" width="24" height="24" fill="#4f46e5"/><text x="310" y="50">2nd nearest</text>
  <line x1="92" y1="95" x2="108" y2="95" stroke="#111" stroke-width="2"/><text x="90" y="84">d1</text>
  <line x1="92" y1="92" x2="340" y2="74" stroke="#111" stroke-dasharray="5 4" stroke-width="2"/>
  <text x="220" y="105">d2</text><text x="200" y="180">copy when d1 / d2 &lt; ⅓</text>
</svg>"""

IET_SVG = """
<svg viewBox="0 0 560 200" width="560" role="img" aria-label="Data split into shards, one proxy model per shard, averaged">
  <style>text{font:14px sans-serif}</style>
  <rect x="10" y="70" width="80" height="60" rx="6" fill="#e0e7ff"/><text x="22" y="105">all data</text>
  {shards}
  <rect x="430" y="70" width="120" height="60" rx="6" fill="#fde68a"/><text x="442" y="98">average</text>
  <text x="442" y="118">= global model</text>
  <text x="180" y="195">each round: proxies start from the global model</text>
</svg>"""


def iet_svg(k: int = 4) -> str:
    shards = []
    for i in range(k):
        y = 15 + i * 45
        shards.append(f'<line x1="90" y1="100" x2="130" y2="{y + 15}" stroke="#6b7280"/>'
                      f'<rect x="130" y="{y}" width="90" height="30" rx="4" fill="#c7d2fe"/>'
                      f'<text x="140" y="{y + 20}">shard {i + 1}</text>'
                      f'<line x1="220" y1="{y + 15}" x2="260" y2="{y + 15}" stroke="#6b7280"/>'
                      f'<rect x="260" y="{y}" width="110" height="30" rx="4" fill="#a7f3d0"/>'
                      f'<text x="270" y="{y + 20}">proxy model {i + 1}</text>'
                      f'<line x1="370" y1="{y + 15}" x2="430" y2="100" stroke="#6b7280"/>')
    return IET_SVG.replace("{shards}", "".join(shards))


def illustrative_histogram():
    """A made-up ratio distribution: most visits near 1, a memorized bump at low ratios."""
    rng = np.random.default_rng(0)
    ratios = np.concatenate([rng.lognormal(0.0, 0.35, 4000), rng.lognormal(np.log(0.3), 0.3, 600)])
    snapshot = RatioSnapshot.of(ratios, skipped=int((ratios < 0.5).sum()))
    return charts.ratio_histogram(snapshot, 0.5, applied=0.5, title="Illustration: loss ratios of training visits")


def build(ctx: common.AppContext, page: gr.Blocks) -> None:
    common.page_header("Learn: memorization and how IET-AGC tries to reduce it", "Seven ideas, each with the place in this app "
                       "where you can see it.")
    gr.Markdown("""
## 1 · A diffusion model learns to remove noise
Training adds noise of a random strength *t* to a training image and teaches the network to predict that noise.
To generate, it starts from pure noise and removes it step by step. The **loss** is how wrong the noise
prediction was. → [Monitor](monitor): the loss curve.

## 2 · Memorization: new images, or copies?
With few training images and long training, the network can store the images themselves: its samples become
**near-copies** of training images. This matters for privacy and copyright (photos of people, artwork).
→ [Data](data): fewer images memorize sooner. [Memorization](memorization): samples next to their
nearest training image.
""")
    with gr.Row():
        gr.HTML(NEAREST_SVG)
        gr.Markdown("""
## 3 · Measuring it
For each generated sample, find the nearest training image (distance *d1*) and the second nearest (*d2*). When
*d1* is less than a third of *d2*, the sample sits right on top of one training image: a **copy**. The share of
copies among many samples is the memorization ratio; **MQ** is the reference code's variant, and **FID** checks
that quality does not suffer. → [Memorization](memorization): the histogram with the one-third line.
""")
    with gr.Row():
        gr.HTML(iet_svg())
        gr.Markdown("""
## 4 · IET: iterative ensemble training
Split the training set into *K* shards. Each round, *K* proxy models start from the global model and each trains
on its own shard only; then they are averaged (weighted by shard size). No single model sees every image every
step, so it has less chance to store any one image. → [Train](train): *Method* and *Shards K*.
""")
    with gr.Row():
        gr.Plot(illustrative_histogram(), show_label=False)
        gr.Markdown("""
## 5 · AGC: skip the suspiciously easy samples
A memorized image is easy: its loss is far below the usual loss at that noise level. AGC keeps a **memory bank**
of the recent loss for each noise level *t* and computes **loss / bank[t]** for every sample. When that ratio is
below the threshold **λ** (0.5 in the paper) the sample is skipped: no gradient, so the model stops
sharpening its copy. → [Monitor](monitor): the live ratio histogram with λ drawn on it, the what-if
slider, and the most-skipped training images.
""")
    gr.Markdown("""
## 6 · IET-AGC+: don't just skip, redistribute and augment
Skipping forever means never learning those images properly. **MSR** (memory samples redistribution) moves
often-skipped images to another shard after each round, so a different proxy learns them. **TAA**
(threshold-aware augmentation) augments an image more strongly (flips, shifts, zoom, light colour changes) the
closer its loss ratio comes to λ, so it is harder to memorize. → [Train](train): choose IET-AGC+ to see their
settings.

## 7 · Judge at equal quality, not only at equal compute
Less memorization is good news only if the samples are as good. What this project measured on 64 digits
(docs/results.md, with sample counts and 95% intervals):
- With K = 4 and short rounds (25 local steps per proxy), evaluated from EMA weights on randomly drawn shards,
  IET-AGC memorized almost nothing mostly because it learned more slowly: trained longer, it reached the baseline's
  quality and memorized about as much. Evaluated as the papers did (raw averaged weights, class-balanced shards,
  3 seeds), the same rounds reached the baseline's final quality in two seeds of three with 4% copies against the
  baseline's 42-68%. On the digits at their own 8x8 (the Start page's demo) all three seeds came as near to
  unseen digits as the baseline with 1-1.4% copies against 39-62%. Trained on to 6,000 steps they started to copy
  too (17-18%, about as near to unseen digits as the baselines), where the baselines copied 76-90% and IET
  without AGC 22-28%: later and less, not never.
- With longer rounds (62 local steps, class-balanced shards, raw averaged weights as the papers evaluated, 3
  seeds), IET-AGC reached the baseline's quality later. Where it did, the 1/3 rule counted fewer copies (0% and 19%
  against the baseline's 42-68%) in two seeds of three, but a measure without a threshold (distance to the nearest
  training image over distance to the nearest unseen one) found its samples only slightly farther from their
  training images: it **delays** copying more than it prevents it, here. One round of 750 steps averaged into noise.
- The same rounds without AGC (IET alone) copied as little as IET-AGC and learned as fast or faster: in this
  regime the averaging of proxies, not the skip rule, keeps the copies down. With 25 local steps the skip rule
  took a little more off at 16x16 (4% against IET alone's 6-8%, lower in each of three seed pairs).
- The copy criteria disagree: smoothed copies pass the 1/3 rule, and on colour photos a model that has not learned
  yet makes noisy copies of one image that the rule misses. Look at the gallery, not only the number.
- AGC's skip rule alone (K = 1) memorized about 16 points less than the baseline after 2,000 steps, at equal quality,
  in three of three seeds.

The papers train far longer (100 epochs per proxy per round on 5,000 images each, a 36M-parameter UNet). So:
compare runs at several points of training, look at quality next to memorization, and read every share with its
interval. → [Compare](compare): both side by side.

### Try it
1. [Start](./): *Start the demo* (a baseline and an IET-AGC run on 64 digits).
2. [Monitor](monitor): watch the ratio histogram of the IET-AGC run; slide the what-if λ.
3. [Memorization](memorization): generate samples of each finished run.
4. [Compare](compare): pick both runs and compare their copies and quality.
""")
