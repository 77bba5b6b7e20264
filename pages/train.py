"""2 · Train: pick a mode and its settings (only those that apply are shown), start, pause,
stop and resume. Training runs on the server: closing the tab does not stop it."""
from __future__ import annotations

import gradio as gr

import dataclasses

from iet_core.config import (MODEL_PRESETS, MSR_POLICIES, ConfigError, DataConfig, RunConfig, method_for_mode,
                             recipe_config)
from iet_core.data import DataError
from iet_core.neighbours import resolve_device
from pages import common
from pages.data import RESOLUTIONS, source_label

TITLE, PATH = "2 · Train", "train"
POLL_SECONDS = 2.0
MODE_LABELS = {"ddpm": "Baseline DDPM (one model, all data)", "iet": "IET (K proxies on K shards, averaged)",
               "iet-agc": "IET-AGC (+ skip suspiciously easy samples)", "iet-agc+": "IET-AGC+ (+ MSR and TAA)"}

# The form's presets are the engine's recipes (iet_core.config.RECIPES), shown by these labels;
# the data comes from the Data page.
PRESET_LABELS = {"classroom": f"Classroom demo · CPU · ~{recipe_config('classroom').train.time_budget_minutes:g} min",
                 "quick": "Quick look · CPU · 2-3 min, curves only",
                 "gpu-small": "GPU · small model · 32×32 colour", "paper": "Paper reference · GPU · hours"}
# The Model choice that fine-tunes a Stable Diffusion pipeline on captioned images (the engine's
# sd-lora / sd-full recipes) instead of training a UNet preset from scratch.
TEXT_TO_IMAGE = "text-to-image"
MODEL_CHOICES = [*((name, name) for name in MODEL_PRESETS), ("text-to-image fine-tune (Stable Diffusion)", TEXT_TO_IMAGE)]
PIXEL_STAND_IN = "none: pixel stand-in (near-exact copies only)"
NO_CLIP_SCORE = "none: not measured"


def preset_values(recipe: str) -> dict:
    """The form's values for a recipe."""
    config = recipe_config(recipe, "iet-agc")
    train = config.train
    in_steps = train.local_steps is not None
    return dict(model=config.model.preset, shards=config.method.num_shards, rounds=train.rounds,
                unit="steps" if in_steps else "epochs", amount=train.local_steps if in_steps else train.local_epochs,
                batch_size=train.batch_size, lr=train.lr, preview=train.preview_samples)


GPU_PRESETS = {"gpu-small": (32, 3), "paper": (32, 3)}  # the data each GPU preset is made for


def preset_note(recipe: str, data: DataConfig, device: str) -> str:
    """A warning when a preset does not fit the chosen data or this machine ('' when it does)."""
    if recipe not in GPU_PRESETS:
        return ""
    notes = []
    if device == "cpu":
        notes.append("this server has no GPU: on its CPU this preset takes hours (the CPU presets take minutes)")
    resolution, channels = GPU_PRESETS[recipe]
    if (data.resolution, data.channels) != (resolution, channels):
        notes.append(f"it is made for {resolution}×{resolution} colour images, and the chosen data is "
                     f"{data.resolution}×{data.resolution} {'greyscale' if data.channels == 1 else 'colour'}: "
                     "choose the data on the [Data page](data) first")
    text = "; ".join(notes)
    return f"⚠ {text[:1].upper()}{text[1:]}." if notes else ""


def build_config(data: DataConfig, *, name: str, mode: str, preset: str, model: str, shards: int, rounds: int,
                 unit: str, amount: float, batch_size: int, lr: float, seed: int, skip_lambda: float,
                 bank_decay: float, msr_threshold: float, msr_policy: str, taa_band: float, taa_strength: float,
                 preview: int, evaluate_after: bool = True, pretrained: str | None = None, lora_rank: int = 4,
                 resolution: int | None = None, guidance_scale: float = 7.5,
                 feature_extractor: str | None = None, clip_model: str | None = None) -> RunConfig:
    """A validated RunConfig from the form. The preset's recipe supplies what the form does not
    show (optimizer, warmup, EMA); a text-to-image fine-tune (model TEXT_TO_IMAGE) starts from
    the engine's sd-lora recipe (sd-full when lora_rank is 0) with the pretrained pipeline."""
    fine_tune = model == TEXT_TO_IMAGE
    if fine_tune:
        if not data.caption_column:
            raise ConfigError("the text-to-image fine-tune trains on captioned images: upload a captioned set "
                              "(metadata.jsonl or .txt captions) or a Hugging Face dataset with its caption column on "
                              "the Data page.")
        config = recipe_config("sd-lora" if lora_rank else "sd-full", mode)
        # captions go with colour images; the resolution the images are resized to
        data = dataclasses.replace(data, channels=3, resolution=int(resolution or data.resolution))
        config.model.pretrained = pretrained
        config.text2image.lora_rank = int(lora_rank) or None
        config.text2image.guidance_scale = float(guidance_scale)
        config.text2image.feature_extractor, config.text2image.clip_model = feature_extractor, clip_model
    else:
        config = recipe_config(preset, mode)
        config.model.preset = model
    config.name = (name or "").strip() or f"{mode}-{data.source.split('/')[-1].removesuffix('.npz')[:24]}"
    config.data = data
    config.method = method_for_mode(mode, int(shards))
    config.method.agc.skip_lambda, config.method.agc.bank_decay = float(skip_lambda), float(bank_decay)
    config.method.msr.threshold, config.method.msr.policy = float(msr_threshold), msr_policy
    config.method.taa.band, config.method.taa.max_strength = float(taa_band), float(taa_strength)
    config.method.taa.enabled &= not fine_tune  # latents are cached: TAA's pixel augmentations cannot act
    train = config.train
    train.rounds, train.batch_size, train.lr, train.seed = int(rounds), int(batch_size), float(lr), int(seed)
    train.local_steps, train.local_epochs = (int(amount), None) if unit == "steps" else (None, float(amount))
    train.preview_samples = int(preview)
    config.eval.after_training = bool(evaluate_after)
    return RunConfig.from_dict(config.to_dict()).validate()  # from_dict: form values checked like a JSON config


def fine_tune_values(mode: str = "iet-agc") -> dict:
    """The form's values for a text-to-image fine-tune: the engine's sd-lora recipe."""
    config = recipe_config("sd-lora", mode)
    train = config.train
    return dict(rounds=train.rounds, unit="steps", amount=train.local_steps, batch_size=train.batch_size, lr=train.lr,
                preview=train.preview_samples, skip_lambda=config.method.agc.skip_lambda,
                lora_rank=config.text2image.lora_rank, guidance_scale=config.text2image.guidance_scale)


def offered_models(ctx: common.AppContext) -> tuple[dict[str, str], dict[str, str]]:
    """What the admin's model folders offer, by name: Stable Diffusion pipelines, and the rest
    (TorchScript files, transformers folders) as copy-detection feature extractors."""
    pipelines, extractors = {}, {}
    for name, path in ctx.jobs.sources.offered_models().items():
        (pipelines if (path / "model_index.json").exists() else extractors)[name] = str(path)
    return pipelines, extractors


def base_model(ctx: common.AppContext, offered: str | None, hub_id: str | None) -> str:
    """The pipeline to fine-tune: a Hub id typed by the visitor, else one the server offers by
    name. A typed path is checked as the engine checks a config's (refused alike whether it
    exists or not, unless inside the admin's model folders)."""
    typed = (hub_id or "").strip()
    if typed:
        ctx.jobs.sources.check_model(typed)
        return typed
    pipelines, _ = offered_models(ctx)
    if offered not in pipelines:
        hub = ", or type a Hugging Face model id as owner/name" if ctx.jobs.sources.hub else ""
        raise DataError(f"choose a base model this server offers{hub} "
                        f"(offered: {', '.join(pipelines) or 'none: the admin names model folders with --model-dir'}).")
    return pipelines[offered]


def evaluation_model(ctx: common.AppContext, offered: str | None, none: str) -> str | None:
    """A copy-detection feature extractor or CLIP score model the server offers by this name
    (None for the `none` choice)."""
    if not offered or offered == none:
        return None
    _, models = offered_models(ctx)
    if offered not in models:
        raise DataError(f"choose one of the models this server offers for evaluation, or {none!r}.")
    return models[offered]


def start_run(ctx: common.AppContext, session: dict | None, values: dict) -> tuple[str, dict, str]:
    """Start a run from the form's values (the names of build_config's settings, plus
    base_model, hub_model, extractor and clip for a text-to-image fine-tune, by the names the
    server offers): the message, the session, the run id."""
    session = common.ensure_owner(session)
    values = dict(values)
    offered, hub_id = values.pop("base_model", None), values.pop("hub_model", None)
    extractor, clip = values.pop("extractor", None), values.pop("clip", None)
    if values.get("model") == TEXT_TO_IMAGE:
        values["pretrained"] = base_model(ctx, offered, hub_id)
        values["feature_extractor"] = evaluation_model(ctx, extractor, PIXEL_STAND_IN)
        values["clip_model"] = evaluation_model(ctx, clip, NO_CLIP_SCORE)
    config = build_config(common.chosen_data(session), **values)
    run_id = ctx.jobs.submit(config, session["owner"])
    session["run_id"] = run_id
    position = ctx.jobs.queue_position(run_id)
    where = f"It is **#{position} in the queue**." if position else "It is training now."
    kind = " · text-to-image fine-tune" if config.text2image.enabled else ""
    message = (f"Started **{config.name}** ({MODE_LABELS[config.method.mode]}{kind}). {where} "
               f"[Watch it on the Monitor page →](monitor)")
    return message, session, run_id


def demo_run_config(mode: str) -> RunConfig:
    """The classroom demo: built-in digits and the demo preset."""
    values = preset_values(common.DEMO_PRESET)
    return build_config(recipe_config(common.DEMO_PRESET).data, name=f"demo-{mode}", mode=mode, preset=common.DEMO_PRESET, model=values["model"],
                        shards=values["shards"], rounds=values["rounds"], unit=values["unit"], amount=values["amount"],
                        batch_size=values["batch_size"], lr=values["lr"], seed=0, skip_lambda=0.5, bank_decay=0.8,
                        msr_threshold=0.5, msr_policy="least-skipped", taa_band=0.5, taa_strength=1.0,
                        preview=values["preview"])


def build(ctx: common.AppContext, page: gr.Blocks) -> None:
    session = common.session_state(ctx)
    common.page_header("Train", "Start a run with a preset, or change the settings first. Only the settings of the "
                       "chosen mode are shown. The run trains on the server: you can close this tab and come back.")
    data_text = gr.Markdown()
    demo = preset_values(common.DEMO_PRESET)  # the form opens on the demo preset
    with gr.Column():
        with gr.Column(variant="panel"):
            with gr.Row():
                preset = gr.Dropdown([(label, recipe) for recipe, label in PRESET_LABELS.items()], value=common.DEMO_PRESET, label="Preset", scale=3,
                                     info="Fills the settings below; the data comes from the Data page.")
                name = gr.Textbox(label="Run name", placeholder="(automatic)", scale=2)
            preset_warning = gr.Markdown(elem_id="preset-warning")
            mode = gr.Radio([(label, m) for m, label in MODE_LABELS.items()], value="iet-agc", label="Method",
                            info="Train a baseline and an IET-AGC run on the same data, then compare them.")
            with gr.Row():
                shards = gr.Slider(2, 16, value=demo["shards"], step=1, label="Shards K (proxies)")
                rounds = gr.Number(demo["rounds"], precision=0, minimum=1, label="Rounds")
                unit = gr.Radio(["epochs", "steps"], value=demo["unit"], label="Local training per round in")
                amount = gr.Number(demo["amount"], minimum=0.01, label="Local epochs (or steps) per proxy")
            with gr.Row():
                model = gr.Dropdown(MODEL_CHOICES, value=demo["model"], label="Model", min_width=300,
                                    info="tiny ≈1M (CPU) · small ≈17M · ddpm-cifar10 ≈36M · or fine-tune Stable "
                                         "Diffusion on captioned images")
                batch_size = gr.Number(demo["batch_size"], precision=0, minimum=1, label="Batch size")
                lr = gr.Number(demo["lr"], minimum=1e-7, label="Learning rate")
                seed = gr.Number(0, precision=0, label="Seed")
                preview = gr.Number(demo["preview"], precision=0, minimum=0, maximum=256, label="Samples shown per round")
            pipelines, extractors = offered_models(ctx)
            tuned = fine_tune_values()
            with gr.Group(visible=False) as fine_tune_group:
                gr.Markdown("**Text-to-image fine-tune**: IET-AGC on a Stable Diffusion pipeline's UNet, as LoRA "
                            "adapters (the K proxies are K adapters over one frozen base) or in full, on the captioned "
                            "images of the Data page. TAA stays off (latents are computed once); IET-AGC+ adds MSR.")
                with gr.Row():
                    base = gr.Dropdown(list(pipelines), value=next(iter(pipelines), None), label="Base model",
                                       info="Stable Diffusion pipelines this server offers",
                                       elem_id="base-model")
                    hub_model = gr.Textbox(label="or a Hugging Face model id", placeholder="owner/name",
                                           info="e.g. stabilityai/stable-diffusion-2-1-base (needs the network)",
                                           visible=ctx.jobs.sources.hub)
                    lora_rank = gr.Number(tuned["lora_rank"], precision=0, minimum=0, maximum=1024,
                                          label="LoRA rank (0 = full UNet fine-tune)")
                with gr.Row():
                    t2i_resolution = gr.Dropdown(RESOLUTIONS, value=256, label="Resolution (pixels)",
                                                 info="SD 2.1 base: 512; the reference fine-tunes at 256")
                    guidance = gr.Slider(0, 20, value=tuned["guidance_scale"], step=0.5,
                                         label="Guidance scale (evaluation)",
                                         info="Classifier-free guidance when generating from the training captions")
                    extractor = gr.Dropdown([PIXEL_STAND_IN, *extractors], value=PIXEL_STAND_IN,
                                            label="Copy detection features",
                                            info="SSCD / DINOv2 / CLIP offered by this server; copies: similarity > 0.5")
                    clip = gr.Dropdown([NO_CLIP_SCORE, *extractors], value=NO_CLIP_SCORE, label="CLIP score model",
                                       info="A CLIPModel offered by this server: how well generations match their prompts")
            with gr.Group() as agc_group:
                gr.Markdown("**AGC: anti-gradient control**: skip a sample when loss / bank[t] < λ, bank[t] being "
                            "the recent loss at the same noise level.")
                with gr.Row():
                    skip_lambda = gr.Slider(0.05, 1.0, value=0.5, step=0.01, label="Skip threshold λ",
                                            info="0.5 is the paper's (mem_ratio 2). Higher skips more.")
                    bank_decay = gr.Slider(0.0, 0.99, value=0.8, step=0.01, label="Bank decay γ",
                                           info="bank[t] ← γ·bank[t] + (1−γ)·loss. The paper uses 0.8.")
            with gr.Group(visible=False) as plus_group:
                gr.Markdown("**IET-AGC+**: MSR moves often-skipped samples to another shard after each round; TAA "
                            "augments a sample more the closer its loss ratio is to λ.")
                with gr.Row():
                    msr_threshold = gr.Slider(0.0, 0.95, value=0.5, step=0.05, label="MSR: move when skip rate >")
                    msr_policy = gr.Dropdown(list(MSR_POLICIES), value="least-skipped", label="MSR: move to")
                    taa_band = gr.Slider(0.05, 2.0, value=0.5, step=0.05, label="TAA band above λ",
                                         info="Ratios above λ + band are not augmented.")
                    taa_strength = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="TAA strength at λ")
            evaluate_after = gr.Checkbox(True, label="Measure copies when training ends",
                                         info="Generates samples and finds their nearest training images, so the "
                                              "Memorization page shows the result without another click.")
            start = gr.Button("▶ Start training", variant="primary", size="lg", elem_id="start-training")
            started = gr.Markdown(elem_id="train-started")
        with gr.Column():
            gr.Markdown("### Runs\nSteer the run you picked (only from the browser that started it).")
            picker, refresh_list = common.run_picker()
            status = gr.Markdown(elem_id="train-status")
            controls = common.run_controls(ctx, picker, session)
            gr.Markdown("[Open the Monitor page →](monitor)")
    timer = gr.Timer(POLL_SECONDS)

    form = dict(name=name, mode=mode, preset=preset, model=model, shards=shards, rounds=rounds, unit=unit,
                amount=amount, batch_size=batch_size, lr=lr, seed=seed, skip_lambda=skip_lambda,
                bank_decay=bank_decay, msr_threshold=msr_threshold, msr_policy=msr_policy, taa_band=taa_band,
                taa_strength=taa_strength, preview=preview, evaluate_after=evaluate_after, base_model=base,
                hub_model=hub_model, lora_rank=lora_rank, resolution=t2i_resolution, guidance_scale=guidance,
                extractor=extractor, clip=clip)
    keys = list(form)

    def apply_preset(choice, session):
        values = preset_values(choice)
        return (values["model"], values["shards"], values["rounds"], values["unit"], values["amount"],
                values["batch_size"], values["lr"], values["preview"],
                preset_note(choice, common.chosen_data(session), resolve_device("auto").type))

    preset.change(apply_preset, [preset, session], [model, shards, rounds, unit, amount, batch_size, lr, preview,
                                                    preset_warning], api_visibility="private")

    def show_mode(choice):
        return (gr.update(visible=choice != "ddpm"), gr.update(visible=choice in ("iet-agc", "iet-agc+")),
                gr.update(visible=choice == "iet-agc+"))

    mode.change(show_mode, mode, [shards, agc_group, plus_group], api_visibility="private")

    def show_model(choice):
        """The fine-tune's settings, and the sd-lora recipe's values when it is chosen."""
        if choice != TEXT_TO_IMAGE:
            return [gr.update(visible=False)] + [gr.skip()] * 7
        tuned = fine_tune_values()
        return [gr.update(visible=True), *(tuned[k] for k in ("rounds", "unit", "amount", "batch_size", "lr", "preview",
                                                               "skip_lambda"))]

    model.change(show_model, model, [fine_tune_group, rounds, unit, amount, batch_size, lr, preview, skip_lambda],
                 api_visibility="private")

    @common.user_errors
    def start_training(session, *values):
        message, session, run_id = start_run(ctx, session, dict(zip(keys, values)))
        return message, session, gr.update(choices=common.run_choices(ctx), value=run_id)

    start.click(start_training, [session, *form.values()], [started, session, picker], api_visibility="private")

    def describe_data(session):
        data = common.chosen_data(session)
        subset = f"{data.subset} images" if data.subset else "all images"
        captioned = " · captioned" if data.caption_column else ""
        return (f"**Data:** {source_label(data)} · {subset} · {data.resolution}×{data.resolution} · "
                f"{'greyscale' if data.channels == 1 else 'colour'}{captioned} · [change on the Data page](data)",
                data.resolution if data.resolution in RESOLUTIONS else gr.skip())

    page.load(describe_data, session, [data_text, t2i_resolution], api_visibility="private")

    def poll(run_id):
        if not run_id:
            return ["No run picked.", *[gr.update(interactive=False)] * len(controls.buttons)]
        status_value = ctx.jobs.status(run_id)
        enabled = common.control_states(status_value)
        return [common.status_text(status_value), *[gr.update(interactive=enabled[name]) for name in controls.buttons]]

    poll_outputs = [status, *controls.buttons.values()]
    timer.tick(poll, picker, poll_outputs, concurrency_limit=None, show_progress="hidden", api_visibility="private")
    picker.change(poll, picker, poll_outputs, concurrency_limit=None, show_progress="hidden", api_visibility="private")
    common.wire_run_picker(ctx, page, picker, refresh_list, session)
