"""2 · Train: pick a mode and its settings (only those that apply are shown), start, pause,
stop and resume. Training runs on the server: closing the tab does not stop it."""
from __future__ import annotations

import gradio as gr

from iet_core.config import MODEL_PRESETS, MSR_POLICIES, DataConfig, RunConfig, method_for_mode, recipe_config
from iet_core.neighbours import resolve_device
from pages import common
from pages.data import source_label

TITLE, PATH = "2 · Train", "train"
POLL_SECONDS = 2.0
MODE_LABELS = {"ddpm": "Baseline DDPM (one model, all data)", "iet": "IET (K proxies on K shards, averaged)",
               "iet-agc": "IET-AGC (+ skip suspiciously easy samples)", "iet-agc+": "IET-AGC+ (+ MSR and TAA)"}

# The form's presets are the engine's recipes (iet_core.config.RECIPES), shown by these labels;
# the data comes from the Data page.
PRESET_LABELS = {"classroom": f"Classroom demo · CPU · ~{recipe_config('classroom').train.time_budget_minutes:g} min",
                 "quick": "Quick look · CPU · 2-3 min, curves only",
                 "gpu-small": "GPU · small model · 32×32 colour", "paper": "Paper reference · GPU · hours"}
DEMO_PRESET = "classroom"


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


def data_config(session: dict | None) -> DataConfig:
    """The data chosen on the Data page, or the demo's digits."""
    return common.session_data(session) or recipe_config(DEMO_PRESET).data


def build_config(data: DataConfig, *, name: str, mode: str, preset: str, model: str, shards: int, rounds: int,
                 unit: str, amount: float, batch_size: int, lr: float, seed: int, skip_lambda: float,
                 bank_decay: float, msr_threshold: float, msr_policy: str, taa_band: float, taa_strength: float,
                 preview: int, evaluate_after: bool = True) -> RunConfig:
    """A validated RunConfig from the form. The preset's recipe supplies what the form does not
    show (optimizer, warmup, EMA)."""
    config = recipe_config(preset, mode)
    config.name = (name or "").strip() or f"{mode}-{data.source.split('/')[-1].removesuffix('.npz')[:24]}"
    config.data = data
    config.model.preset = model
    config.method = method_for_mode(mode, int(shards))
    config.method.agc.skip_lambda, config.method.agc.bank_decay = float(skip_lambda), float(bank_decay)
    config.method.msr.threshold, config.method.msr.policy = float(msr_threshold), msr_policy
    config.method.taa.band, config.method.taa.max_strength = float(taa_band), float(taa_strength)
    train = config.train
    train.rounds, train.batch_size, train.lr, train.seed = int(rounds), int(batch_size), float(lr), int(seed)
    train.local_steps, train.local_epochs = (int(amount), None) if unit == "steps" else (None, float(amount))
    train.preview_samples = int(preview)
    config.eval.after_training = bool(evaluate_after)
    return RunConfig.from_dict(config.to_dict()).validate()  # from_dict: form values checked like a JSON config


def demo_run_config(mode: str) -> RunConfig:
    """The classroom demo: built-in digits and the demo preset."""
    values = preset_values(DEMO_PRESET)
    return build_config(recipe_config(DEMO_PRESET).data, name=f"demo-{mode}", mode=mode, preset=DEMO_PRESET, model=values["model"],
                        shards=values["shards"], rounds=values["rounds"], unit=values["unit"], amount=values["amount"],
                        batch_size=values["batch_size"], lr=values["lr"], seed=0, skip_lambda=0.5, bank_decay=0.8,
                        msr_threshold=0.5, msr_policy="least-skipped", taa_band=0.5, taa_strength=1.0,
                        preview=values["preview"])


def build(ctx: common.AppContext, page: gr.Blocks) -> None:
    session = common.session_state(ctx)
    common.page_header("Train", "Start a run with a preset, or change the settings first. Only the settings of the "
                       "chosen mode are shown. The run trains on the server: you can close this tab and come back.")
    data_text = gr.Markdown()
    demo = preset_values(DEMO_PRESET)  # the form opens on the demo preset
    with gr.Column():
        with gr.Column(variant="panel"):
            with gr.Row():
                preset = gr.Dropdown([(label, recipe) for recipe, label in PRESET_LABELS.items()], value=DEMO_PRESET, label="Preset", scale=3,
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
                model = gr.Dropdown(list(MODEL_PRESETS), value=demo["model"], label="Model",
                                    info="tiny ≈1M (CPU) · small ≈17M · ddpm-cifar10 ≈36M")
                batch_size = gr.Number(demo["batch_size"], precision=0, minimum=1, label="Batch size")
                lr = gr.Number(demo["lr"], minimum=1e-7, label="Learning rate")
                seed = gr.Number(0, precision=0, label="Seed")
                preview = gr.Number(demo["preview"], precision=0, minimum=0, maximum=256, label="Samples shown per round")
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
                taa_strength=taa_strength, preview=preview, evaluate_after=evaluate_after)
    keys = list(form)

    def apply_preset(choice, session):
        values = preset_values(choice)
        return (values["model"], values["shards"], values["rounds"], values["unit"], values["amount"],
                values["batch_size"], values["lr"], values["preview"],
                preset_note(choice, data_config(session), resolve_device("auto").type))

    preset.change(apply_preset, [preset, session], [model, shards, rounds, unit, amount, batch_size, lr, preview,
                                                    preset_warning], api_visibility="private")

    def show_mode(choice):
        return (gr.update(visible=choice != "ddpm"), gr.update(visible=choice in ("iet-agc", "iet-agc+")),
                gr.update(visible=choice == "iet-agc+"))

    mode.change(show_mode, mode, [shards, agc_group, plus_group], api_visibility="private")

    @common.user_errors
    def start_training(session, *values):
        session = common.ensure_owner(session)
        config = build_config(data_config(session), **dict(zip(keys, values)))
        run_id = ctx.jobs.submit(config, session["owner"])
        session["run_id"] = run_id
        position = ctx.jobs.queue_position(run_id)
        where = f"It is **#{position} in the queue**." if position else "It is training now."
        message = (f"Started **{config.name}** ({MODE_LABELS[config.method.mode]}). {where} "
                   f"[Watch it on the Monitor page →](monitor)")
        return message, session, gr.update(choices=common.run_choices(ctx), value=run_id)

    start.click(start_training, [session, *form.values()], [started, session, picker], api_visibility="private")

    def describe_data(session):
        data = data_config(session)
        subset = f"{data.subset} images" if data.subset else "all images"
        return (f"**Data:** {source_label(data)} · {subset} · {data.resolution}×{data.resolution} · "
                f"{'greyscale' if data.channels == 1 else 'colour'} · [change on the Data page](data)")

    page.load(describe_data, session, data_text, api_visibility="private")

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
