"""Copy detection for a fine-tuned text-to-image model: generate from the training captions,
embed generations and training images (iet_core.features), and find every generation's
nearest training image by cosine similarity. Beside the copies, as the reference repository
reports them: the CLIP score of each generation against its prompt (a CLIPModel folder the user
gives) and FID against the training images (local Inception weights); either says "not
measured" and why when its model is missing. Saved like any evaluation (RUN/eval/<name>/),
one table row per generation, with the prompt and the nearest training image for galleries."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from ..config import MEMORIZATION_THRESHOLD, ConfigError, EvalConfig, TextToImageConfig
from ..data import ImageDataset
from ..evaluate import COPY_DETECTION, EvalResult, _side_by_side, measure_fid
from ..features import FeatureExtractor, cosine_neighbours, load_clip_scorer, load_feature_extractor, similarity_ratio
from ..metrics import copy_counts, mean_summary, proportion_interval
from ..runs import Run, checkpoint_step
from ..train import derive_seed
from .export import trained_components
from .model import Components

@dataclass
class CopyResult(EvalResult):
    def pairs(self, limit: int | None = None) -> list[tuple[np.ndarray, str]]:
        """(generation | nearest training image, "prompt -> train id: similarity"), in the order
        of EvalResult.pairs (lowest distance ratio first), so galleries read both alike."""
        order = self.table.sort_values(["memorization_ratio", "sample_id"]).index[:limit]
        out = []
        for i in order:
            row = self.table.loc[i]
            flag = "COPY, " if row["copy"] else ""
            out.append((_side_by_side(self.generated[i], self.nearest[i]),
                        f"{row['caption']!r} -> train {row['nearest_id']}: {flag}similarity {row['similarity']:.3f}"))
        return out

    def per_caption(self) -> pd.DataFrame:
        """One row per prompt: its generations, how many are copies, the highest similarity,
        whether its own training image was the nearest of any, and its mean CLIP score."""
        grouped = self.table.groupby("caption_id", sort=False)
        scores = {"clip_score": ("clip_score", "mean")} if "clip_score" in self.table else {}  # absent in older evaluations
        frame = grouped.agg(caption=("caption", "first"), generations=("sample_id", "size"), copies=("copy", "sum"),
                            max_similarity=("similarity", "max"), own_image_nearest=("own_image", "any"), **scores)
        return frame.sort_values("max_similarity", ascending=False).reset_index()


@torch.no_grad()
def generate(components: Components, prompts: list[str], *, resolution: int, guidance_scale: float, steps: int,
             sampler: str = "ddim", device: torch.device, seed: int = 0, batch_size: int = 8,
             progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """uint8 (N, 3, H, W) at the training resolution, prompt i from its own seed (seed, i), so
    an image does not depend on the batch it was drawn in. progress(done, total) after each batch."""
    pipeline = components.pipeline(sampler).to(device)
    pipeline.set_progress_bar_config(disable=True)
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        generators = [torch.Generator(device).manual_seed(derive_seed(seed, start + j)) for j in range(len(batch))]
        images = pipeline(prompt=batch, height=resolution, width=resolution, num_inference_steps=steps,
                          guidance_scale=guidance_scale, generator=generators, output_type="np").images
        out.append(torch.from_numpy(np.rint(images * 255.0).astype(np.uint8)).permute(0, 3, 1, 2))
        if progress is not None:
            progress(start + len(batch), len(prompts))
    return torch.cat(out)


def detect_copies(generated, caption_positions: np.ndarray, dataset: ImageDataset, extractor: FeatureExtractor,
                  copy_threshold: float = 0.5, ratio_threshold: float = MEMORIZATION_THRESHOLD) -> CopyResult:
    """Every generation's nearest training images in the extractor's space. caption_positions:
    the dataset position of each generation's prompt. A copy: cosine similarity above
    copy_threshold; memorized: distance ratio nearest / second nearest below ratio_threshold."""
    if dataset.captions is None:
        raise ConfigError("copy detection compares with a captioned training set: load it with data.caption_column.")
    if len(dataset) < 2:
        raise ConfigError("copy detection needs at least 2 training images (nearest and second nearest).")
    started = time.perf_counter()
    generated = torch.as_tensor(generated)
    sims, index = cosine_neighbours(extractor(generated), extractor(dataset.images), k=2)
    ratio = similarity_ratio(sims)
    caption_positions = np.asarray(caption_positions, dtype=np.int64)
    ids = dataset.ids.numpy()
    table = pd.DataFrame({
        "sample_id": np.arange(len(generated)), "caption_id": ids[caption_positions],
        "caption": [dataset.captions[p] for p in caption_positions],
        "nearest_id": ids[index[:, 0]], "similarity": sims[:, 0], "second_similarity": sims[:, 1],
        "memorization_ratio": ratio, "copy": sims[:, 0] > copy_threshold, "memorized": ratio < ratio_threshold,
        "own_image": index[:, 0] == caption_positions, "clip_score": np.nan})
    copies, memorized, total = int(table["copy"].sum()), int(table["memorized"].sum()), len(table)
    times_nearest, times_copied = copy_counts(index[:, 0], len(dataset), table["copy"].to_numpy())
    _, times_memorized = copy_counts(index[:, 0], len(dataset), table["memorized"].to_numpy())
    most_copied = pd.DataFrame({"training_id": ids, "caption": dataset.captions, "times_nearest": times_nearest,
                                "times_copied": times_copied, "times_memorized": times_memorized}
                               ).sort_values(["times_copied", "times_nearest", "training_id"], ascending=[False, False, True])
    summary = {
        "kind": COPY_DETECTION, "measure": extractor.name, "num_samples": total, "num_training": len(dataset),
        "num_captions": int(len(np.unique(caption_positions))),
        "copy_threshold": copy_threshold, "copy_count": copies, "copy_fraction": copies / total,
        "copy_interval": list(proportion_interval(copies, total)),
        "memorization_threshold": ratio_threshold, "memorized_count": memorized, "memorized_fraction": memorized / total,
        "memorized_interval": list(proportion_interval(memorized, total)),
        "mean_similarity": float(sims[:, 0].mean()), "own_image_nearest": int(table["own_image"].sum()),
        "distinct_nearest": int((times_nearest > 0).sum()),
        "seconds": {"features": time.perf_counter() - started},
    }
    nearest = dataset.images[torch.from_numpy(index[:, 0])].numpy()
    return CopyResult(table, summary, most_copied.reset_index(drop=True), generated.numpy(), nearest)


CLIP_NOT_GIVEN = "not measured: no CLIP model given (text2image.clip_model, CLI --clip-model: a local CLIPModel folder)."


def clip_scores(generated, caption_positions: np.ndarray, dataset: ImageDataset, clip_model: str | None,
                device: torch.device) -> tuple[np.ndarray | None, dict]:
    """Each generation's CLIP score against its prompt, and the summary fields: the mean with
    its 95% bootstrap interval and count, and for scale the mean of the same captions' own
    training images (the reference's "clipscore_bg"). None and "not measured" without a model."""
    if clip_model is None:
        return None, {"clip_score": None, "clip_message": CLIP_NOT_GIVEN}
    scorer = load_clip_scorer(clip_model, device)
    scores = scorer(generated, [dataset.captions[p] for p in caption_positions])
    captions = np.unique(caption_positions)
    training = mean_summary(scorer(dataset.images[torch.from_numpy(captions)], [dataset.captions[p] for p in captions]))
    stats = mean_summary(scores)
    return scores, {"clip_score": stats["mean"], "clip_score_low": stats["low"], "clip_score_high": stats["high"],
                    "clip_score_count": stats["count"], "clip_score_training": training["mean"],
                    "clip_model": scorer.name, "clip_message": ""}


def copies_of_run(run: Run, checkpoint: Path, dataset: ImageDataset, config: EvalConfig,
                  settings: TextToImageConfig, device: torch.device,
                  progress: Callable[[str, int, int], None] | None = None) -> CopyResult:
    """Generate settings.images_per_caption images for each of config.num_samples /
    images_per_caption training captions (a seeded choice) from the checkpoint, detect copies
    with settings.feature_extractor, and measure the CLIP score (settings.clip_model) and FID
    (config.fid). `iet_core.evaluate.evaluate_run` checks the inputs, calls this for
    text-to-image runs and saves the result; progress(stage, done, total) as there (it may
    raise to cancel)."""
    settings.validate()
    count = max(1, min(len(dataset), config.num_samples // settings.images_per_caption))
    chosen = np.sort(np.random.default_rng(config.seed).choice(len(dataset), count, replace=False))
    positions = np.repeat(chosen, settings.images_per_caption)
    components = trained_components(run, config.use_ema, checkpoint)
    started = time.perf_counter()
    generated = generate(components, [dataset.captions[p] for p in positions], resolution=run.config.data.resolution,
                         guidance_scale=settings.guidance_scale, steps=config.steps, sampler=config.sampler, device=device,
                         seed=config.seed, batch_size=config.batch_size,
                         progress=(lambda done, total: progress("sampling", done, total)) if progress else None)
    sampling_seconds = time.perf_counter() - started
    result = detect_copies(generated, positions, dataset, load_feature_extractor(settings.feature_extractor, device),
                           settings.copy_threshold, config.memorization_threshold)
    started = time.perf_counter()
    scores, clip_summary = clip_scores(generated, positions, dataset, settings.clip_model, device)
    if scores is not None:
        result.table["clip_score"] = scores
    result.summary["seconds"]["clip_score"] = time.perf_counter() - started
    fid, fid_message, result.summary["seconds"]["fid"] = measure_fid(generated, dataset, config, device, progress)
    result.summary.update({"run_id": run.id, "checkpoint": checkpoint.name, "checkpoint_step": checkpoint_step(checkpoint),
                           "weights": "ema" if config.use_ema else "model",
                           "sampler": config.sampler, "steps": config.steps, "seed": config.seed,
                           "guidance_scale": settings.guidance_scale, "images_per_caption": settings.images_per_caption,
                           "device": str(device), **clip_summary, "fid": fid,
                           "fid_dims": config.fid_dims if config.fid else None, "fid_message": fid_message})
    result.summary["seconds"]["sampling"] = sampling_seconds
    return result


def format_copy_summary(summary: dict) -> str:
    low, high = summary["copy_interval"]
    mlow, mhigh = summary["memorized_interval"]
    return "\n".join([
        f"run {summary.get('run_id', '?')}  {summary.get('checkpoint', '')}: {summary['num_samples']} generations from "
        f"{summary['num_captions']} training captions (guidance {summary.get('guidance_scale', '?')}), "
        f"{summary['num_training']} training images",
        f"measure: {summary['measure']}",
        f"copies (similarity > {summary['copy_threshold']:g}): {summary['copy_count']} = "
        f"{100 * summary['copy_fraction']:.1f}% (95% interval {100 * low:.1f}-{100 * high:.1f}%)",
        f"memorized (distance ratio < {summary['memorization_threshold']:.3g}): {summary['memorized_count']} = "
        f"{100 * summary['memorized_fraction']:.1f}% (95% interval {100 * mlow:.1f}-{100 * mhigh:.1f}%)",
        f"mean nearest similarity {summary['mean_similarity']:.3f}; the prompt's own training image was the nearest "
        f"for {summary['own_image_nearest']}",
        _clip_line(summary),
        _fid_line(summary),
    ])


def _clip_line(summary: dict) -> str:
    if summary.get("clip_score") is None:
        return f"CLIP score: {summary.get('clip_message') or 'not measured.'}"
    return (f"CLIP score ({summary['clip_model']}): {summary['clip_score']:.2f} (95% interval "
            f"{summary['clip_score_low']:.2f}-{summary['clip_score_high']:.2f}) over {summary['clip_score_count']} "
            f"generations; the same captions' training images: {summary['clip_score_training']:.2f}")


def _fid_line(summary: dict) -> str:
    if summary.get("fid") is None:
        return f"FID: not measured ({summary.get('fid_message') or 'eval.fid off'})"
    note = f" ({summary['fid_message']})" if summary.get("fid_message") else ""
    return (f"FID ({summary['fid_dims']}-d Inception features): {summary['fid']:.2f} from {summary['num_samples']} "
            f"generations against {summary['num_training']} training images{note}")
