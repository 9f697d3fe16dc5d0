"""The `craft` command: one subcommand per stage, plus the demo and pipeline operations.

Every stage command takes ``--config PROFILE`` (a bundled profile name such as ``demo-histo`` or a
YAML path) and trailing ``key=value`` overrides for that stage's config; named options are
shortcuts for the same keys. This module sits on top of the domain package: it may import
``pipelines`` (lazily, inside commands); nothing in ``craft`` imports it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from craft.config import EXIT_BAD_INPUT, ConfigError, load_stage_config, to_dict

app = typer.Typer(
    name="craft",
    help="Train clinically aligned medical image generators (CRAFTS + CRAFT) on Kubeflow Pipelines, "
    "and refuse to promote one that is not.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Demo datasets and importers of real collections.", no_args_is_help=True)
train_app = typer.Typer(
    help="Training stages (foundation, encoders, reward finetuning, baselines).", no_args_is_help=True
)
pipeline_app = typer.Typer(
    help="Compile the KFP pipeline; upload, run and schedule it on a cluster.", no_args_is_help=True
)
store_app = typer.Typer(
    help="Object store (S3 API): directories with an atomic sha256 manifest.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(store_app, name="store")
experiment_app = typer.Typer(help="Reproduce the papers' tables on the demo modalities.", no_args_is_help=True)
app.add_typer(experiment_app, name="experiment")

ConfigOpt = Annotated[
    str | None, typer.Option("--config", "-c", help="Profile: a bundled name (demo-histo) or a YAML path.")
]
Overrides = Annotated[list[str] | None, typer.Argument(help="Config overrides for this stage: key=value ...")]


class CliError(Exception):
    """An error reported to the user as one line, exit code 2."""


def _fail(msg: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def stage_config(stage: str, config: str | None, overrides: list[str] | None, **options: Any):
    """Load ``stage``'s config from the profile, user overrides, then non-None named options."""
    items = list(overrides or [])
    items += [f"{k}={v}" for k, v in options.items() if v is not None]
    return load_stage_config(stage, config, items)


def _echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


# ----------------------------------------------------------------------------------------------
# data


@data_app.command("demo")
def data_demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset directory to write.")],
    modality: Annotated[str | None, typer.Option(help="histo (H&E-like tiles) or cxr (chest radiographs).")] = None,
    n: Annotated[int | None, typer.Option("--n", help="Number of images.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed; the same seed gives identical files.")] = None,
    resolution: Annotated[int | None, typer.Option(help="Square image side in pixels.")] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Generate a deterministic demo dataset (images, masks, conditions, weak captions, labels)."""
    from craft.data import demo

    cfg = stage_config("data", config, overrides, modality=modality, n=n, seed=seed, resolution=resolution)
    path = demo.main(cfg, out)
    typer.echo(f"wrote {path}")


@data_app.command("import")
def data_import(
    fmt: Annotated[
        str, typer.Argument(metavar="FORMAT", help="csv, imagefolder, fitzpatrick17k, chexpert, breakhis, origa")
    ],
    src: Annotated[Path, typer.Argument(help="Source folder (or CSV file for the csv format).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset directory to write.")],
    modality: Annotated[
        str | None,
        typer.Option(help="histo, cxr, derm, fundus or other (the generic schema); picks the annotation schema."),
    ] = None,
    resolution: Annotated[
        int | None, typer.Option(help="Resize the short side to R (Lanczos) and centre-crop RxR; 0 = native sizes.")
    ] = None,
    captions: Annotated[
        str | None, typer.Option(help="label: caption every image without one from its class (stage 1 needs them).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Dataset name in dataset.yaml (default: the folder's).")] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Import a real collection into the manifest contract with a patient-level split."""
    from craft.data import importers

    cfg = stage_config("import", config, overrides, format=fmt, modality=modality, resolution=resolution,
                       captions=captions, name=name)  # fmt: skip
    path = importers.main(cfg, src, out)
    typer.echo(f"wrote {path}")


@app.command("validate")
def validate(
    dataset_dir: Annotated[Path, typer.Argument(help="Dataset directory (dataset.yaml + manifest.parquet).")],
    report: Annotated[
        Path | None, typer.Option(help="Report folder (default DATASET_DIR/../<name>-validation).")
    ] = None,
    config: ConfigOpt = None,
    base_uri: Annotated[
        str, typer.Option(help="With --config: the run's foundation checkpoint ('' = stage 1 from scratch).")
    ] = "",
    overrides: Overrides = None,
) -> None:
    """Validate a dataset; exit 0 only if every check passes. Writes report.json and report.html.

    With --config PROFILE the plan check runs first (craft.plan.check_plan): does the dataset hold what the
    profile's stages need? It fails in seconds (exit 2) naming each missing piece and the flag that provides it.
    """
    from craft.data import validate as v

    if config:
        from craft.plan import check_plan

        problems = check_plan(dataset_dir, config, list(overrides or []), base_uri=base_uri)
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            raise _fail(f"{dataset_dir} cannot run profile {config} ({len(problems)} missing):\n{lines}")
        typer.echo(f"{dataset_dir}: plan check of profile {config} passed")
    cfg = stage_config("validate", config, overrides)  # other stages' qualified overrides are skipped
    report_dir = report or dataset_dir.parent / f"{dataset_dir.name}-validation"
    result = v.main(cfg, dataset_dir, report_dir)
    if not result.ok:
        raise _fail(f"{dataset_dir}: {len(result.failures)} validation failure(s); see {report_dir}/report.html", 1)
    typer.echo(f"{dataset_dir}: valid ({result.n_rows} rows); report {report_dir}/report.html")


# ----------------------------------------------------------------------------------------------
# object store


@store_app.command("upload")
def store_upload(
    local_dir: Annotated[Path, typer.Argument(help="Folder to upload.")],
    uri: Annotated[str, typer.Argument(help="s3://bucket/datasets/NAME (a versioned dataset) or s3://bucket/prefix")],
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Upload a folder. To s3://B/datasets/NAME: an immutable NAME/<version>/ and then the `latest` pointer
    (moved last); prints the version. Elsewhere: the prefix, committed once its MANIFEST.json is written."""
    from craft.storage import datasets
    from craft.storage.objectstore import ObjectStore

    store = ObjectStore.from_env(stage_config("storage", config, overrides))
    if datasets.is_dataset_base(uri):
        ref = datasets.upload(store, local_dir, uri)
        typer.echo(f"dataset {ref.name} version {ref.version} committed at {ref.resolved_uri}; "
                   f"{uri.rstrip('/')}/{datasets.POINTER} -> {ref.version}")  # fmt: skip
        return
    manifest = store.upload_dir(local_dir, uri)
    typer.echo(f"committed {uri} ({len(manifest['files'])} files)")


@store_app.command("download")
def store_download(
    uri: Annotated[str, typer.Argument(help="s3://bucket/prefix (must be committed)")],
    local_dir: Annotated[Path, typer.Argument(help="Folder to write (replaced atomically).")],
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Download a committed prefix, verifying every file's sha256."""
    from craft.storage.objectstore import ObjectStore

    store = ObjectStore.from_env(stage_config("storage", config, overrides))
    path = store.download_dir(uri, local_dir)
    typer.echo(f"wrote {path}")


# ----------------------------------------------------------------------------------------------
# pipeline


@pipeline_app.command("compile")
def pipeline_compile(
    output: Annotated[Path, typer.Option("--output", "-o", help="Pipeline YAML to write.")] = Path(
        "craft_pipeline.yaml"
    ),
    profile: Annotated[
        str, typer.Option(help="Profile whose `pipeline` plan sets the tasks (runs may pass another profile).")
    ] = "demo-histo",
) -> None:
    """Compile the KFP pipeline to YAML (the file you upload to Kubeflow)."""
    from pipelines.craft_pipeline import compile_pipeline

    compile_pipeline(output, profile)
    typer.echo(f"wrote {output} (plan of profile {profile})")


@app.command("demo")
def demo(
    profile: Annotated[str, typer.Option(help="Profile to run.")] = "demo-histo",
    root: Annotated[Path, typer.Option(help="Local pipeline root (artifacts land here).")] = Path("runs"),
    dataset_uri: Annotated[str, typer.Option(help="Use this dataset instead of generating demo data.")] = "",
    model_name: Annotated[str, typer.Option(help="Registry name of the candidate ('' = the profile's).")] = "",
    base_uri: Annotated[str, typer.Option(help="Foundation checkpoint (folder or s3:// prefix).")] = "",
    overrides: Annotated[list[str] | None, typer.Argument(help="Pipeline-wide overrides: stage.key=value ...")] = None,
) -> None:
    """Run the whole KFP pipeline locally (kfp.local, no cluster); the last line is the gate's verdict."""
    from pipelines.local import format_summary, run_local

    summary = run_local(profile, list(overrides or []), root, dataset_uri=dataset_uri, model_name=model_name,
                        base_uri=base_uri)  # fmt: skip
    typer.echo(format_summary(summary))


@app.command("show-config")
def show_config(
    stage: Annotated[str, typer.Argument(help="Stage name (see craft/config.py STAGES).")],
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Print a stage's resolved config (profile + overrides) as JSON."""
    _echo_json(to_dict(stage_config(stage, config, overrides)))


# --- stage commands (added by each stage) ---


@experiment_app.command("paper-table")
def paper_table_cmd(
    profile: Annotated[str, typer.Option("--profile", "-p", help="Demo profile: demo-histo or demo-cxr.")],
    seeds: Annotated[int, typer.Option(help="Seeds 0..N-1 (stage 2, adapters, evaluation noise).")] = 3,
    root: Annotated[Path | None, typer.Option(help="Run folder (default runs/paper-table/PROFILE); resumes.")] = None,
    results: Annotated[
        Path, typer.Option("--results", help="Markdown file; this profile's section is replaced.")
    ] = Path("RESULTS.md"),
    table4: Annotated[bool, typer.Option(help="Train the Table 4 single-reward / leave-one-out variants.")] = True,
    crafts_ablation: Annotated[bool, typer.Option(help="Train stage 2 without L_corr + L_cate too.")] = True,
    threads: Annotated[int, typer.Option(help="Torch CPU threads of every stage (0 = the profile's).")] = 0,
    table4_seeds: Annotated[
        int | None, typer.Option(help="Train the Table 4 variants for seeds 0..K-1 only (default: all).")
    ] = None,
    first_seed: Annotated[
        int, typer.Option(help="Run seeds S..S+N-1 (split seeds over processes on one --root; aggregate after).")
    ] = 0,
    remedies: Annotated[
        bool, typer.Option(help="Also train + evaluate every reward-hacking remedy (issue 21), each monitored.")
    ] = False,
    remedy: Annotated[
        list[str] | None,
        typer.Option(
            "--remedy", help="Train + evaluate this remedy only (repeatable; see craft.experiment.REMEDIES)."
        ),
    ] = None,
    overrides: Overrides = None,
) -> None:
    """Train and evaluate every variant of CRAFT Tables 1, 2, 4, 14 and the CRAFTS ablation; write RESULTS.md."""
    import sys

    from craft.experiment import paper_table

    res = paper_table(profile, seeds, root or Path("runs/paper-table") / Path(profile).stem, results,
                      overrides or [], table4=table4, crafts_ablation=crafts_ablation,
                      command="craft " + " ".join(sys.argv[1:]), threads=threads, table4_seeds=table4_seeds,
                      first_seed=first_seed, remedies=True if remedies else list(remedy or []))  # fmt: skip
    typer.echo(f"wrote {results} (section {profile}) and {res['info']['wall_seconds'] / 60:.1f} min of work")


@experiment_app.command("tune-dpo")
def tune_dpo_cmd(
    profile: Annotated[str, typer.Option("--profile", "-p", help="The profile of a finished paper-table run.")],
    root: Annotated[Path | None, typer.Option(help="Its run folder (default runs/paper-table/PROFILE).")] = None,
    seed: Annotated[int, typer.Option(help="The finished seed whose stage-2 model and TI+LoRA DPO starts from.")] = 0,
    heldout_pairs: Annotated[int, typer.Option(help="Held-out critic-judged pairs DPO's objective is read on.")] = 64,
    overrides: Overrides = None,
) -> None:
    """Diffusion-DPO at several settings, each read on its own objective on held-out pairs (issue 21: a fair DPO)."""
    from craft.experiment import dpo_tune_markdown, tune_dpo

    rows = tune_dpo(profile, root or Path("runs/paper-table") / Path(profile).stem, seed, overrides or [],
                    heldout_pairs)  # fmt: skip
    typer.echo(dpo_tune_markdown(rows))


@experiment_app.command("reeval")
def reeval_cmd(
    profile: Annotated[str, typer.Option("--profile", "-p", help="The profile of a finished paper-table run.")],
    variant: Annotated[list[str], typer.Option("--variant", help="A finished variant to compare (repeatable).")],
    root: Annotated[Path | None, typer.Option(help="Its run folder (default runs/paper-table/PROFILE).")] = None,
    seeds: Annotated[int, typer.Option(help="Seeds 0..N-1.")] = 3,
    samples: Annotated[int, typer.Option(help="Samples per held-out prompt (the tables use 2).")] = 4,
    ref: Annotated[str, typer.Option(help="The variant the differences are taken against.")] = "ti_lora",
    overrides: Overrides = None,
) -> None:
    """Evaluate finished variants again with more samples per prompt: paired differences with tighter intervals."""
    from craft.experiment import reevaluate, reevaluate_markdown

    res = reevaluate(profile, root or Path("runs/paper-table") / Path(profile).stem, list(range(seeds)), variant,
                     samples, overrides or [], ref)  # fmt: skip
    typer.echo(reevaluate_markdown(res, samples))


@app.command("evaluate")
def evaluate_cmd(
    dataset_dir: Annotated[Path, typer.Argument(help="Dataset directory; its test split drives the protocol.")],
    annotations: Annotated[Path, typer.Option(help="Annotate output (annotations.parquet, checklists.json).")],
    variant: Annotated[
        list[str], typer.Option("--variant", help="name=MODEL_DIR[:ADAPTER_DIR], repeatable ('real' is added).")
    ],
    evaluator: Annotated[str, typer.Option(help="Evaluator encoder directory (never the critic).")],
    evaluator_probe: Annotated[Path, typer.Option("--evaluator-probe", help="DD probe trained on the evaluator.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for metrics.json, per_image.parquet, report.html.")],
    critic: Annotated[str | None, typer.Option(help="Training critic: refused as evaluator.")] = None,
    critic_probe: Annotated[
        str | None, typer.Option("--critic-probe", help="The critic's DD probe: report its training reward too.")
    ] = None,
    evaluator2: Annotated[str | None, typer.Option(help="Optional out-of-family second evaluator.")] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Score every variant on the held-out prompts with the evaluator; print the candidate's gate metrics.

    A variant named ``champion`` is the model it is compared with (e.g. production, downloaded with
    `craft store download`); report.html opens with the profile's gate verdict.
    """
    from craft.evaluate import run as ev
    from craft.models.encoders import load_encoder

    cfg = stage_config("evaluate", config, overrides)
    try:
        variants = dict(ev.parse_variant(v) for v in variant)
    except ValueError as e:
        raise _fail(str(e)) from None
    critic_id = load_encoder(critic).identity if critic else None
    gates = load_stage_config("gates", config, []) if config else None
    metrics = ev.main(cfg, dataset_dir, annotations, variants, evaluator, evaluator_probe, out, critic_id, evaluator2,
                      critic_dir=critic, critic_probe_dir=critic_probe, gates=gates)  # fmt: skip
    _echo_json({"candidate": metrics["candidate"], "champion": metrics.get("champion"), "out": str(out)})


@app.command("gate")
def gate_cmd(
    results: Annotated[Path, typer.Argument(help="An evaluation folder (metrics.json of `craft evaluate`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for decision.json and decision.html.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model name ('' = the profile's).")] = "",
    fail: Annotated[bool, typer.Option("--fail/--no-fail", help="Exit 1 when refused (--no-fail: like KFP).")] = True,
    config: ConfigOpt = "gates",
) -> None:
    """The pipeline's gate on a local evaluation: candidate vs champion under the profile's gates; exit 1 if refused."""
    from craft.promote import gate_step

    out.mkdir(parents=True, exist_ok=True)
    passed, _ = gate_step(results, out / "decision.html", config or "gates", [], model, decision_dir=out)
    if not passed and fail:
        raise typer.Exit(1)


DataOpt = Annotated[Path, typer.Option("--data", help="Dataset directory.")]
BaseOpt = Annotated[str, typer.Option("--base", help="Base pipeline (dir or s3://) the adapter is trained on.")]
AdapterOut = Annotated[Path, typer.Option("--out", "-o", help="Adapter directory to write (safetensors).")]


@train_app.command("reward")
def train_reward_cmd(
    data: DataOpt,
    annotations: Annotated[Path, typer.Option(help="Annotate output (annotations.parquet, checklists.json).")],
    critic: Annotated[str, typer.Option(help="Critic encoder directory (frozen).")],
    probe: Annotated[Path, typer.Option(help="Linear probe directory trained on the critic (frozen).")],
    base: BaseOpt,
    out: AdapterOut,
    start: Annotated[
        Path | None, typer.Option(help="TI+LoRA adapter whose LoRA to continue (default: a fresh LoRA).")
    ] = None,
    referee: Annotated[
        str | None, typer.Option(help="The monitor's referee encoder (reward.monitor; never the evaluator).")
    ] = None,
    referee_probe: Annotated[Path | None, typer.Option(help="The referee's linear probe.")] = None,
    ensemble: Annotated[
        list[str] | None,
        typer.Option(help="An extra critic as ENCODER_DIR,PROBE_DIR (repeat once per member; reward.ensemble=N)."),
    ] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """CRAFT: LoRA reward finetuning with DRaFT-K against the frozen critic (VDC, CCS, DD, SFS)."""
    from craft.train import reward

    cfg = stage_config("reward", config, overrides)
    pairs = []
    for member in ensemble or []:
        enc, sep, prb = member.partition(",")
        if not sep or not enc or not prb:
            raise typer.BadParameter(f"--ensemble {member!r}: expected ENCODER_DIR,PROBE_DIR")
        pairs.append((enc, prb))
    _echo_json(reward.main(cfg, data, annotations, critic, probe, base, out, start_dir=start, referee_dir=referee,
                           referee_probe_dir=referee_probe, ensemble=pairs))  # fmt: skip


@train_app.command("ti")
def train_ti_cmd(data: DataOpt, base: BaseOpt, out: AdapterOut, config: ConfigOpt = None,
                 overrides: Overrides = None) -> None:  # fmt: skip
    """Baseline: textual inversion, one learned token per class."""
    from craft.train import baselines

    _echo_json(baselines.ti_main(stage_config("ti", config, overrides), data, base, out))


@train_app.command("ti-lora")
def train_ti_lora_cmd(
    data: DataOpt,
    base: BaseOpt,
    out: AdapterOut,
    ti: Annotated[Path | None, typer.Option(help="TI output to start from (default: train TI first).")] = None,
    annotations: Annotated[Path | None, typer.Option(help="Annotate output (for prompts=enriched).")] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Baseline: TI tokens, then LoRA on the UNet cross-attention with the diffusion loss."""
    from craft.train import baselines

    cfg = stage_config("ti_lora", config, overrides)
    _echo_json(baselines.ti_lora_main(cfg, data, base, out, ti_dir=ti, annotations_dir=annotations))


@train_app.command("dpo")
def train_dpo_cmd(
    data: DataOpt,
    annotations: Annotated[Path, typer.Option(help="Annotate output (annotations.parquet, checklists.json).")],
    critic: Annotated[str, typer.Option(help="Critic encoder directory (judges the pairs).")],
    probe: Annotated[Path, typer.Option(help="Linear probe directory trained on the critic.")],
    base: BaseOpt,
    out: AdapterOut,
    start: Annotated[Path | None, typer.Option(help="TI+LoRA adapter to start from (and reference).")] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Baseline: Diffusion-DPO on critic-judged pairs of two seed-varied samples per prompt."""
    from craft.train import baselines

    cfg = stage_config("dpo", config, overrides)
    _echo_json(baselines.dpo_main(cfg, data, annotations, critic, probe, base, out, start_dir=start))


@train_app.command("pretrain")
def train_pretrain_cmd(
    data: Annotated[Path, typer.Option("--data", help="Dataset directory (weak captions in the manifest).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model directory to write (diffusers layout).")],
    base: Annotated[
        str | None, typer.Option(help="Start from this model (dir or s3://); default: train from scratch.")
    ] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """CRAFTS stage 1: weak-caption pretraining with L_corr (first-stage autoencoder too when no --base)."""
    from craft.train import crafts

    cfg = stage_config("pretrain", config, overrides)
    _echo_json(crafts.pretrain(cfg, data, out, base))


@train_app.command("finetune")
def train_finetune_cmd(
    data: Annotated[Path, typer.Option("--data", help="Dataset directory with labels.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model directory to write (diffusers layout).")],
    base: Annotated[str | None, typer.Option(help="Stage-1 model (dir or s3://); default: from scratch.")] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """CRAFTS stage 2: labelled fine-tuning ("<class phrase>, <caption>") with L_corr + L_cate."""
    from craft.train import crafts

    cfg = stage_config("finetune", config, overrides)
    _echo_json(crafts.finetune(cfg, data, out, base))


@app.command("sample")
def sample_cmd(
    model_dir: Annotated[str, typer.Argument(help="Model directory or s3:// prefix (diffusers layout).")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt (repeat for several).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for PNGs + grid.png.")],
    n: Annotated[int, typer.Option("--n", help="Images per prompt.")] = 4,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 20,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale (<= 1: none).")] = 4.0,
    scheduler: Annotated[str, typer.Option(help="ddim or ddpm.")] = "ddim",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    adapter: Annotated[
        str | None, typer.Option(help="Adapter dir (TI tokens / LoRA from craft train reward|ti|ti-lora|dpo).")
    ] = None,
    controlnet: Annotated[
        str | None, typer.Option(help="ControlNet dir (craft train controlnet); needs --condition.")
    ] = None,
    condition: Annotated[
        Path | None, typer.Option(help="Condition image for --controlnet (instance-mask PNG or fluorescence image).")
    ] = None,
) -> None:
    """Sample images from a text-to-image model (DDIM/DDPM, classifier-free guidance, seeded)."""
    from craft.sample import sample

    if controlnet or condition:  # ControlNet sampling; --prompt "" = the prompt it was trained with
        from craft.sample import sample_controlnet

        if not (controlnet and condition) or adapter or len(prompt) != 1:
            raise CliError("--controlnet and --condition go together, with one --prompt and no --adapter")
        path = sample_controlnet(model_dir, controlnet, condition, out, n=n, prompt=prompt[0], steps=steps,
                                 guidance=guidance, seed=seed, scheduler=scheduler)  # fmt: skip
        typer.echo(f"wrote {path}/grid.png")
        return
    path = sample(model_dir, list(prompt), n, out, steps=steps, guidance=guidance, scheduler=scheduler, seed=seed,
                  adapter=adapter)  # fmt: skip
    typer.echo(f"wrote {path}/grid.png")


@data_app.command("import-paired")
def data_import_paired(
    layout: Annotated[str, typer.Argument(help="consep, glysac, instance (masks) | hemit, shift, pairs (folders)")],
    src: Annotated[Path, typer.Argument(help="Source folder (see craft/data/paired.py for each layout).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset directory to write.")],
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Import paired ControlNet data (condition + H&E target) into the manifest contract."""
    from craft.data import paired

    cfg = stage_config("import_paired", config, overrides, layout=layout)
    typer.echo(f"wrote {paired.main(cfg, src, out)}")


@train_app.command("controlnet")
def train_controlnet_cmd(
    base: Annotated[str, typer.Argument(help="Frozen base pipeline (stage-2 model, or stage-1 for the baseline).")],
    dataset_dir: Annotated[Path, typer.Argument(help="Dataset with mask_path / condition_path columns.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="ControlNet directory to write.")],
    condition: Annotated[str | None, typer.Option(help="mask (nuclear instance mask) or fluorescence.")] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Train a ControlNet on the frozen base model: nuclear mask / fluorescence -> H&E (CRAFTS Fig. 4)."""
    from craft.train import controlnet

    cfg = stage_config("controlnet", config, overrides, condition=condition)
    _echo_json(controlnet.main(cfg, dataset_dir, base, out))


@app.command("compare-controlnets")
def compare_controlnets_cmd(
    dataset_dir: Annotated[Path, typer.Argument(help="Dataset with the paired test images.")],
    runs: Annotated[list[str], typer.Option("--run", help="NAME=CONTROLNET_DIR:BASE_DIR (repeat).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder (table, triplet grids, report.html).")],
    evaluator: Annotated[str, typer.Option(help='Evaluator encoder dir for the domain FID ("" = none).')] = "",
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Score ControlNets against the paired real images (SSIM/MSE/NCC/PSNR, FID, mask adherence)."""
    from craft.evaluate import controlnet_eval

    parsed = {}
    for r in runs:
        name, sep, dirs = r.partition("=")
        cn, sep2, base = dirs.partition(":")
        if not (sep and sep2 and name and cn and base):
            raise CliError(f"--run {r!r}: expected NAME=CONTROLNET_DIR:BASE_DIR")
        parsed[name] = (cn, base)
    cfg = stage_config("controlnet", config, overrides)
    table = controlnet_eval.compare(
        parsed, dataset_dir, out, split=cfg.eval_split, n=cfg.eval_images, evaluator=evaluator or None,
        steps=cfg.sample_steps, guidance=cfg.sample_guidance, seed=cfg.loop.seed,
        conditioning_scale=cfg.conditioning_scale,
    )  # fmt: skip
    typer.echo((out / "table.md").read_text())
    typer.echo(f"wrote {out}/report.html ({len(table)} runs)")


@train_app.command("encoder")
def train_encoder_cmd(
    dataset_dir: Annotated[Path, typer.Argument(help="Dataset directory; only its train split is used.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Encoder directory to write (HF layout).")],
    role: Annotated[
        str,
        typer.Option(
            help="critic, evaluator, evaluator2, referee (each has its own arch and seed) or critic-K "
            "(the K-th extra critic of reward.ensemble: the critic's arch, encoder.ensemble_seeds[K-1])."
        ),
    ],
    annotations: Annotated[
        Path | None, typer.Option(help="annotations.parquet (or its folder): enriched prompts as texts.")
    ] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Train a small dual encoder contrastively for one role (demo stand-in for MedSigLIP / SigLIP)."""
    from craft.train import encoder

    cfg = stage_config("encoder", config, overrides)
    _echo_json(encoder.main(cfg, role, dataset_dir, out, annotations))


@train_app.command("probe")
def train_probe_cmd(
    encoder_dir: Annotated[str, typer.Argument(help="Frozen encoder: local directory or s3:// prefix.")],
    dataset_dir: Annotated[Path, typer.Argument(help="Dataset directory; the probe sees real train images only.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for probe.safetensors + probe.json.")],
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Train the DD linear probe (CRAFT A.2) on one frozen encoder's embeddings; print train/test accuracy."""
    from craft.train import probe

    cfg = stage_config("probe", config, overrides)
    _echo_json(probe.main(cfg, encoder_dir, dataset_dir, out))


@app.command("annotate")
def annotate(
    dataset_dir: Annotated[Path, typer.Argument(help="Dataset directory (dataset.yaml + manifest.parquet).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for annotations.parquet + checklists.json.")],
    backend: Annotated[str | None, typer.Option(help="openai | transformers | offline")] = None,
    base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible server URL (key: $OPENAI_API_KEY).")] = None,
    model: Annotated[
        str | None, typer.Option(help="Model name (openai) or local model folder (transformers).")
    ] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Write one label-conditioned enriched prompt per image and the class checklists (resumable)."""
    from craft.annotate import run

    cfg = stage_config("annotate", config, overrides, backend=backend, base_url=base_url, model=model)
    summary = run.main(cfg, dataset_dir, out)
    if summary["ok_total"] < summary["images"]:
        raise _fail(
            f"{summary['images'] - summary['ok_total']} image(s) not annotated; see {out}/annotations.parquet", 1
        )


@app.command("annotate-checklists")
def annotate_checklists(
    dataset_dir: Annotated[Path, typer.Argument(help="Dataset directory (dataset.yaml + manifest.parquet).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="checklists.json to write.")],
    backend: Annotated[str | None, typer.Option(help="openai | transformers")] = None,
    base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible server URL (key: $OPENAI_API_KEY).")] = None,
    model: Annotated[
        str | None, typer.Option(help="Model name (openai) or local model folder (transformers).")
    ] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Generate 5-attribute clinical checklists for every class with an MLLM and validate them."""
    from craft.annotate import run

    cfg = stage_config(
        "annotate", config, overrides, backend=backend, base_url=base_url, model=model, checklist="generate"
    )
    result = run.write_checklists(cfg, dataset_dir, out)
    typer.echo(f"wrote {out} ({len(result)} classes)")


RegistryOpt = Annotated[
    str | None, typer.Option(help="Registry root s3://bucket or s3://bucket/prefix (env CRAFT_REGISTRY).")
]


@pipeline_app.command("upload")
def pipeline_upload(
    profile: Annotated[
        str, typer.Option(help="Profile whose `pipeline` plan is compiled and uploaded as pipeline craft-<profile>.")
    ] = "demo-histo",
    package: Annotated[
        Path | None,
        typer.Option(
            "--package", "-p", help="YAML from `craft pipeline compile --profile PROFILE` (default: compile now)."
        ),
    ] = None,
    version: Annotated[
        str | None, typer.Option(help="Version name (default: craft-<profile>-<code version>-<UTC time>).")
    ] = None,
    description: Annotated[str, typer.Option(help="Pipeline / version description.")] = "",
) -> None:
    """Upload PROFILE's DAG to KFP_HOST as pipeline craft-<profile>, a new version when it exists (token: KFP_TOKEN)."""
    from pipelines import client as kc

    try:
        client, namespace = kc.make_client()
        out = kc.upload_profile(client, profile, package, version, description, namespace=namespace)
    except (kc.KfpConfigError, ConfigError) as e:
        raise _fail(str(e)) from e
    _echo_json(out)


@pipeline_app.command("run")
def pipeline_run(
    profile: Annotated[str, typer.Option(help="Profile of the run; its pipeline craft-<profile> is the one run.")],
    dataset_uri: Annotated[
        str, typer.Option(help="s3:// prefix of an uploaded dataset ('' = the profile's demo data).")
    ] = "",
    base_uri: Annotated[
        str, typer.Option(help="Foundation checkpoint, folder or s3:// prefix ('' = stage 1 from scratch).")
    ] = "",
    model_name: Annotated[
        str, typer.Option(help="Registry name the run gates and registers ('' = the profile's name).")
    ] = "",
    version_id: Annotated[
        str | None, typer.Option(help="Version id of craft-<profile> to run (default: its latest).")
    ] = None,
    experiment: Annotated[str, typer.Option(help="Experiment (created when missing).")] = "craft",
    run_name: Annotated[str | None, typer.Option(help="Run name (default: craft-<profile>-<UTC time>).")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="Pipeline-wide overrides: stage.key=value ...")] = None,
) -> None:
    """Start a run of PROFILE's pipeline on KFP_HOST with all five run parameters."""
    from pipelines import client as kc

    try:
        kc.run_params(profile, overrides, dataset_uri, base_uri, model_name)  # refuse before contacting the host
        client, namespace = kc.make_client()
        out = kc.run(client, profile, list(overrides or []), dataset_uri, base_uri, model_name, version_id=version_id,
                     experiment=experiment, namespace=namespace, run_name=run_name)  # fmt: skip
    except (kc.KfpConfigError, ConfigError) as e:
        raise _fail(str(e)) from e
    _echo_json(out)


@pipeline_app.command("schedule")
def pipeline_schedule(
    profile: Annotated[str, typer.Option(help="Profile every run uses; the CronJob is craft-retrain-<profile>.")],
    cron: Annotated[str, typer.Option(help="When to check for new data: 5-field cron in UTC, e.g. '0 3 * * *'.")],
    dataset: Annotated[str, typer.Option(help="Dataset to watch: s3://BUCKET/datasets/NAME (craft store upload).")],
    model_name: Annotated[
        str, typer.Option(help="Registered model to keep up to date ('' = the profile's name, as the pipeline).")
    ] = "",
    base_uri: Annotated[
        str, typer.Option(help="Foundation checkpoint the runs get (needed by profiles that import it).")
    ] = "",
    namespace: Annotated[str, typer.Option(help="Namespace of the deployed k8s overlay.")] = "craft",
    image: Annotated[
        str | None, typer.Option(help="CLI image (default: the CPU image of components/images.py).")
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the manifest here, not stdout.")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="Pipeline-wide overrides: stage.key=value ...")] = None,
) -> None:
    """Render the retraining CronJob for PROFILE (`craft retrain-if-new-data` on a cron) for `kubectl apply -f`."""
    from pipelines import client as kc

    try:
        text = kc.render_retrain_cronjob(profile, cron, dataset, model_name=model_name, base_uri=base_uri,
                                         overrides=list(overrides or []), namespace=namespace, image=image)  # fmt: skip
    except (ConfigError, ValueError) as e:
        raise _fail(str(e)) from e
    if output is None:
        typer.echo(text, nl=False)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    typer.echo(f"wrote {output}: CronJob craft-retrain-{kc.profile_name(profile)} in namespace {namespace} "
               f"(kubectl apply -f {output})")  # fmt: skip


@app.command("retrain-if-new-data")
def retrain_if_new_data(
    model: Annotated[str, typer.Option("--model", "-m", help="Registered model to keep up to date.")],
    dataset: Annotated[
        str, typer.Option(help="s3://B/datasets/NAME (latest pointer), an s3:// prefix, a .dvc file or dvc:// URI.")
    ],
    profile: Annotated[str, typer.Option(help="Profile of the new run.")] = "demo-histo",
    force: Annotated[bool, typer.Option("--force", help="Start a run even if one was claimed already.")] = False,
    root: Annotated[Path, typer.Option(help="Local pipeline root when KFP_HOST is unset.")] = Path("runs"),
    registry: RegistryOpt = None,
    config: ConfigOpt = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="Pipeline-wide overrides: stage.key=value ...")] = None,
) -> None:
    """Start a pipeline run only for a dataset version no model was trained on (CronJob entry point).

    A claimed run is reconciled by its run id (running: wait; failed: start again, bounded; succeeded:
    done); a version that failed validation is never retried. With KFP_HOST set the run goes to Kubeflow
    Pipelines; without it the whole pipeline runs here (kfp.local) against the same object store.
    """
    from craft import retrain as rt
    from craft.config import check_run_overrides
    from pipelines import client as kc

    cfg = stage_config("retrain", config, None, model=model, profile=profile, dataset=dataset, force=force)
    cfg.overrides = check_run_overrides(list(cfg.overrides) + list(overrides or []))
    if os.environ.get("KFP_HOST"):
        start, status = kc.start_run, kc.run_status
    else:
        start, status = kc.local_run_starter(root), None
    outcome = rt.main(cfg, _registry(config, registry), start, run_status=status)
    typer.echo(f"{outcome.action}: {outcome.message}")
    if outcome.action in ("failed", "gave-up"):
        raise typer.Exit(1)


def _registry(config: str | None, registry: str | None):
    """The model registry on the object store: storage/registry sections of ``config``, keys from env."""
    from craft.storage.objectstore import ObjectStore
    from craft.storage.registry import Registry

    reg_cfg = stage_config("registry", config, None, root=registry)
    return Registry(ObjectStore.from_env(stage_config("storage", config, None)), reg_cfg.resolved_root())


@app.command("promote")
def promote(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Option("--version", "-v", help="Candidate version id (12 hex, `craft models`).")],
    gates: Annotated[
        str | None,
        typer.Option("--gates", help="Reviewed gates file/profile (section `gates`); default: the version's profile."),
    ] = None,
    registry: RegistryOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Evaluate the gates only; move nothing.")] = False,
    reason: Annotated[str, typer.Option(help="Why, recorded in the history (e.g. the CI run URL).")] = "",
    report: Annotated[Path | None, typer.Option(help="Write the decision as JSON here.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Move `production` to a registered version if the gates pass on its champion-vs-challenger evaluation.

    What CI runs. Exit 1 naming each failing gate (or a champion that changed since the evaluation).
    Gates come from a reviewed file only: there are no overrides.
    """
    from craft import promote as p
    from craft.io import atomic_write_json

    outcome = p.promote_version(model, version, _registry(config, registry), gates=gates, dry_run=dry_run,
                                reason=reason)  # fmt: skip
    typer.echo(outcome.decision.table())
    if report is not None:
        atomic_write_json(report, outcome.to_dict())
    if not outcome.decision.passed:
        raise _fail(f"{model}: version {version} refused: {outcome.decision.failure_text()}", 1)
    if outcome.promoted:
        typer.echo(f"{model}: production {outcome.production_before or '(none)'} -> {version} "
                   f"(gates {outcome.gates['file']} {outcome.gates['gates_sha256']})")  # fmt: skip
    else:
        why = "dry run" if dry_run else f"{version} is already in production"
        typer.echo(f"{model}: gates passed; production unchanged ({why})")


@app.command("rollback")
def rollback(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    to: Annotated[str | None, typer.Option("--to", help="Version id (default: the previous production).")] = None,
    reason: Annotated[str, typer.Option(help="Why, recorded in the history.")] = "",
    registry: RegistryOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Point production back at an earlier version; the move is recorded in the history."""
    reg = _registry(config, registry)
    before = reg.get_production(model)
    pointer = reg.rollback(model, to=to, reason=reason)
    typer.echo(f"{model}: production {before['version'] if before else '(none)'} -> {pointer['version']} (rollback)")


@app.command("models")
def models(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    registry: RegistryOpt = None,
    config: ConfigOpt = None,
) -> None:
    """A model's versions (with dataset and gate numbers), its aliases and the alias history, as JSON."""
    reg = _registry(config, registry)
    versions = []
    for v in reg.list_versions(model):
        info = reg.get_version(model, v["version"])
        lin, met = info["lineage"], info["metrics"]
        versions.append({**v, "dataset": lin.get("dataset"), "code_version": lin.get("code_version"),
                         "run": lin.get("run"), "champion": (met.get("champion") or {}).get("version"),
                         "candidate_metrics": met.get("candidate")})  # fmt: skip
    _echo_json({"aliases": reg.aliases(model), "production": reg.get_production(model), "versions": versions,
                "history": reg.history(model)})  # fmt: skip


def main() -> None:
    """Entry point: run the app, turning config and input errors into one-line messages (exit 2)."""
    if os.environ.get("CRAFT_DEBUG"):
        app()
        return
    try:
        # Without standalone mode click returns a typer.Exit's code instead of exiting: pass it on.
        rc = app(standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (ConfigError, CliError, FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(EXIT_BAD_INPUT)  # bad input or config: a rerun cannot fix it (craft.config.BadInput)
    except Exception as e:  # click usage errors carry their own exit code
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
