"""One run, for any task, as public steps: setup → load_data → build_model → adapt → train_model → test → save →
publish. Each step reads and fills a `Run`; recipes/*.py show them one by one in `main()`, and `run(task_name)`
chains them in one call (the CLI, the tests).
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from datasets import DatasetDict

from hftl import wiseft, zeroshot
from hftl.config import AUTO_LR, RunConfig, is_auto_lr, parse_config
from hftl.curves import CURVES_FILE, plot_learning_curves
from hftl.data import load_dataset_dict, standard_splits, subsample
from hftl.fastpaths import probe_features
from hftl.fastpaths.processed_cache import cache_processed
from hftl.image_check import check_images
from hftl.log import console, get_logger
from hftl.lr_find import range_test, save_range_test
from hftl.outputs import save_model, write_results
from hftl.preflight import preflight
from hftl.strategies import Adapted, apply_strategy, enable_activation_checkpointing
from hftl.system import configure_threads
from hftl.tasks import DataSpec, Task, get_task, task_args
from hftl.trainer import evaluate, make_loader, train

logger = get_logger(__name__)


def run(task_name: str, argv: list[str] | None = None, defaults: dict | None = None) -> dict:
    config = parse_config(argv, defaults, task_args(task_name))
    return run_config(task_name, config)


def _make_accelerator(config: RunConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    train_args = config.train
    trackers = None if train_args.report_to in ("none", "", None) else train_args.report_to.split(",")
    precision = train_args.mixed_precision
    # one process may hold several runs (a notebook, a grid, the tests): each decides its own precision and
    # accumulation; the process group (PartialState) is kept
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(
        # without a GPU, `accelerate launch --multi_gpu` must still give one gloo process group across the ranks
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision,
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        log_with=trackers,
        project_config=ProjectConfiguration(
            project_dir=train_args.output_dir, logging_dir=str(Path(train_args.output_dir) / "runs")
        ),
        # pinned batches are copied to the GPU asynchronously, overlapping the previous step
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=torch.cuda.is_available()),
    )


def _check_output_dir(config: RunConfig) -> None:
    out = Path(config.train.output_dir)
    if (out / "config.json").exists() and not (
        config.train.overwrite_output_dir or config.train.resume_from_checkpoint
    ):
        raise FileExistsError(
            f"{out} already holds a model. Pass --overwrite_output_dir, --resume_from_checkpoint latest, "
            "or another --output_dir."
        )


def prepare_data(
    task: Task, config: RunConfig, skipped: dict | None = None, check: bool = True
) -> tuple[DatasetDict, DataSpec]:
    """Loads and checks the dataset; returns (DatasetDict with train/validation/test, what the task found in it).
    Images dropped by `--on_bad_image skip` are added to `skipped` ({split: [file, ...]}) when given. `check`
    False leaves the image check to the caller (load_data: once for all ranks)."""
    data_args, seed = config.data, config.train.seed
    dsd = load_dataset_dict(data_args, task)
    dsd = standard_splits(dsd, data_args, seed, stratify_column=data_args.label_column or "label")
    spec = task.data_spec(dsd, data_args)
    dsd = task.encode_labels(dsd, spec.label_names)
    dsd = subsample(dsd, data_args, seed, spec.label_column)
    if check and spec.image_column:
        dsd, dropped = check_images(dsd, spec.image_column, data_args.on_bad_image)
        if skipped is not None:
            skipped.update(dropped)
    return dsd, spec


def lr_find(task_name: str, argv: list[str] | None = None) -> dict:
    """`hftl lr-find`: only the learning-rate range test of the run `argv` describes (lr_find.png/json in its
    output_dir); returns {"learning_rate": suggestion, "plot": path}."""
    config = parse_config(argv, task_args=task_args(task_name))
    config.train.learning_rate = AUTO_LR
    return run_config(task_name, config, lr_find_only=True)


@dataclass
class Run:
    """What the steps of one run hand on to each other: each step reads what earlier ones filled in and fills in its
    own (named in its docstring). A recipe may replace any step with its own code that fills the same fields."""

    task_name: str
    config: RunConfig
    task: Task
    accelerator: Any
    threads: tuple = ()
    started: float = field(default_factory=time.perf_counter)
    # load_data
    dsd: DatasetDict | None = None
    spec: DataSpec | None = None
    sizes: dict = field(default_factory=dict)
    skipped_images: dict = field(default_factory=dict)
    stream: tuple | None = None
    # build_model
    model: Any = None
    processor: Any = None
    zero_shot_state: dict | None = None
    # adapt
    adapted: Adapted | None = None
    # train_model
    prepared: DatasetDict | None = None
    main_metric: str = ""
    greater: bool = True
    decoded: Any = None
    result: Any = None
    # test
    test_metrics: dict = field(default_factory=dict)
    test_evaluator: Any = None
    wise: dict | None = None
    # save
    results: dict = field(default_factory=dict)


def run_config(task_name: str, config: RunConfig, lr_find_only: bool = False) -> dict:
    """Every step, in order: what each recipe's `main()` shows section by section. `lr_find_only`: stop after the
    learning-rate range test (`--learning_rate auto`) and return its suggestion."""
    run = setup(task_name, config)
    load_data(run)
    build_model(run)
    adapt(run)
    train_model(run, lr_find_only)
    if lr_find_only:
        return run.results
    test(run)
    save(run)
    publish(config, run.results)
    return run.results


def setup(task_name: str, config: RunConfig) -> Run:
    """Console logging, checks that fail fast (output folder, preflight), torch threads, the Accelerator and the
    task object."""
    console()
    _check_output_dir(config)
    preflight(config)
    threads = configure_threads(config.train.num_threads)
    accelerator = _make_accelerator(config)
    logger.info(f"torch threads: {threads[0]} ({threads[1]})")
    return Run(task_name, config, get_task(task_name, config), accelerator, threads)


def load_data(run: Run) -> Run:
    """Fills dsd, spec, sizes, skipped_images (and stream with --streaming): the dataset loaded, split, checked."""
    config, task = run.config, run.task
    with run.accelerator.main_process_first():
        if config.data.streaming:
            from hftl.streaming import prepare_streaming

            run.dsd, run.spec, run.stream = prepare_streaming(task, config)
        else:
            run.dsd, run.spec = prepare_data(task, config, check=False)
        if config.strategy.wise_ft_alpha and config.strategy.wise_ft_eval_datasets:
            # once the class names are known, before the images are checked or the model built: fails in seconds
            wiseft.check_eval_datasets(config, run.spec.label_names)
    if run.spec.image_column:
        # outside main_process_first: the main process opens the images, the other ranks get its findings; a
        # stream's train images are checked as they are read (hftl/streaming.py)
        splits = DatasetDict({k: v for k, v in run.dsd.items() if not (run.stream and k == "train")})
        checked, dropped = check_images(splits, run.spec.image_column, config.data.on_bad_image, shared=True)
        run.dsd = DatasetDict({**run.dsd, **checked})
        run.skipped_images.update(dropped)
    run.sizes = {split: len(ds) for split, ds in run.dsd.items()} | ({"train": run.stream[1]} if run.stream else {})
    logger.info(
        f"data: {config.data.dataset}: {len(run.spec.label_names)} classes; "
        + ", ".join(f"{k} {v}" for k, v in run.sizes.items())
    )
    return run


def build_model(run: Run) -> Run:
    """Fills model, processor (and zero_shot_state for WiSE-FT): the pretrained model with a head for the labels."""
    config = run.config
    # new heads and adapters (LoRA's A matrices) are drawn from the global RNG: --seed decides them, not whatever
    # ran earlier in this process
    set_seed(config.train.seed)
    run.model, run.processor = run.task.load_model(config.model, run.spec.id2label)
    if config.model.from_scratch:
        run.model = random_init(run.model, config.train.seed)
    run.zero_shot_state = wiseft.snapshot(run.model) if config.strategy.wise_ft_alpha else None
    return run


def adapt(run: Run) -> Run:
    """Fills adapted: the strategy's frozen, grouped or PEFT-wrapped model (hftl/strategies.py)."""
    config = run.config
    # with --learning_rate auto the groups' rates are multipliers until the range test has picked the base rate
    lr = 1.0 if is_auto_lr(config.train.learning_rate) else config.train.learning_rate
    run.adapted = apply_strategy(run.model, run.task, config.strategy, lr)
    if config.train.gradient_checkpointing:
        enable_activation_checkpointing(run.adapted.model)
    logger.info(f"strategy {config.strategy.strategy}: {run.adapted.summary()}")
    return run


def train_model(run: Run, lr_find_only: bool = False) -> Run:
    """Fills prepared, main_metric, greater, decoded, result: the transforms set, the fast paths chosen, the
    learning-rate range test (`--learning_rate auto`; with `lr_find_only` only that, its suggestion in results),
    the training loop run (hftl/trainer.py) with the best evaluation's weights kept; model is the trained one."""
    config, task, accelerator, adapted, processor = run.config, run.task, run.accelerator, run.adapted, run.processor
    dsd, spec, stream, id2label = run.dsd, run.spec, run.stream, run.spec.id2label
    prepared = task.prepare(dsd, processor, config.data, spec)
    if accelerator.is_main_process:
        Path(config.train.output_dir).mkdir(parents=True, exist_ok=True)
    if config.train.report_to not in ("none", "", None):
        accelerator.init_trackers("hftl", config=_flat_hparams(config))

    run.main_metric = main_metric = config.train.metric_for_best or task.main_metric
    run.greater = greater = not main_metric.endswith("loss") and task.greater_is_better
    # --- fast paths (hftl/fastpaths/: processed_cache, probe_features, decoded_images) ---
    # splits whose transforms are deterministic are processed once and kept (tasks that say so)
    prepared = cache_processed(prepared, task.deterministic_splits(config.data))
    train_adapted, train_ds, eval_ds, collate = adapted, prepared["train"], prepared["validation"], task.collate
    probe, decoded = None, None
    if stream is not None:  # --streaming: this rank's shards of the train stream (hftl/streaming.py)
        from hftl.streaming import StreamedSplit

        train_transform = prepared["train"].format["format_kwargs"]["transform"]
        train_ds = StreamedSplit(
            stream[0], train_transform, spec.image_column, stream[1], config.train.seed,
            config.data.shuffle_buffer_size, config.train.batch_size, accelerator.process_index,
            accelerator.num_processes,
        )  # fmt: skip
    elif config.strategy.strategy == "linear-probe" and config.train.cache_features:
        probe = probe_features.cached_linear_probe(task, adapted, dsd, processor, config, accelerator)
        if probe is not None:  # the head trains on cached backbone features; adapted.model gets the trained head
            train_adapted, train_ds, eval_ds, collate = probe
    scale = None
    if config.strategy.strategy == "linear-probe" and probe is None and config.train.probe_standardise:
        # the head trains inside the model: the same scale as on cached features, from a sample of train rows
        scale = probe_features.scale_uncached_probe(task, adapted, dsd, processor, config, accelerator)
    if stream is None and probe is None and adapted.trainable:
        decoded = task.decoded_train_split(dsd["train"], processor, config.data)
        if decoded is not None:  # augmented epochs from images decoded once (hftl/fastpaths/decoded_images.py)
            train_ds = decoded
            megabytes = decoded.images.megabytes
            logger.info(f"train images kept decoded as first read: up to {megabytes:.1f} MB per node")
    # --- end fast paths ---
    # the probe's cached features are not images: no batch-level augmentation for them
    train_collate = task.train_collate(config.data, len(spec.label_names)) if probe is None else None
    if is_auto_lr(config.train.learning_rate):
        found = range_test(
            task, train_adapted, train_ds, train_collate or collate, config.train, accelerator,
            steps=config.train.lr_find_steps,
        )  # fmt: skip
        plot = save_range_test(found, config.train.output_dir) if accelerator.is_main_process else None
        if lr_find_only:
            logger.info(f"suggested learning rate: {found.suggestion:.3g}  ({plot})")
            run.results = {"learning_rate": found.suggestion, "plot": str(plot)}
            return run
        scale_learning_rate(train_adapted, found.suggestion)
        config.train.learning_rate = found.suggestion
        logger.info(f"learning rate (range test): {found.suggestion:.3g}")
    if config.strategy.strategy == "zero-shot":
        result = zeroshot.evaluate_only(task, adapted.model, eval_ds, collate, config, accelerator, id2label)
    else:
        result = train(
            task,
            train_adapted,
            train_ds,
            eval_ds,
            collate,
            config.train,
            accelerator,
            id2label,
            main_metric,
            greater,
            train_collate_fn=train_collate,
            processor=processor,
        )
    if probe is not None:  # the head trained on standardised features: fold that into its weights
        train_adapted.model.fold()
    if scale is not None:
        scale.fold()
    run.model = accelerator.unwrap_model(adapted.model)
    # train images skipped as they were read (a stream, or a train split too large to check up front), by any rank
    from accelerate.utils import gather_object

    read_bad = result.state.skipped_images
    read_bad = sorted(set(gather_object(list(read_bad)))) if accelerator.num_processes > 1 else sorted(set(read_bad))
    if read_bad:
        run.skipped_images["train"] = sorted(set(run.skipped_images.get("train", [])) | set(read_bad))
    run.prepared, run.decoded, run.result = prepared, decoded, result
    return run


def test(run: Run) -> Run:
    """Fills test_metrics, test_evaluator (and wise for WiSE-FT, which may replace model): the test split."""
    config, task, accelerator, id2label = run.config, run.task, run.accelerator, run.spec.id2label
    eval_bs = config.train.eval_batch_size or 2 * config.train.batch_size
    test_loader = accelerator.prepare(
        make_loader(run.prepared["test"], task.collate, eval_bs, False, config.train.seed, config.train.num_workers)
    )
    run.test_metrics, run.test_evaluator = evaluate(
        task, accelerator.prepare(run.model), test_loader, accelerator, id2label, run.processor
    )
    if run.zero_shot_state is not None:  # WiSE-FT: the best zero-shot/fine-tuned interpolation replaces the model
        run.model, run.wise, run.test_metrics, run.test_evaluator = wiseft.choose(
            task, run.model, run.zero_shot_state, run.prepared, run.dsd, run.processor, config, accelerator,
            id2label, run.main_metric, run.greater, run.test_metrics,
        )  # fmt: skip
    logger.info("test: " + "  ".join(f"{k}={v:.4f}" for k, v in run.test_metrics.items() if isinstance(v, float)))
    return run


def save(run: Run) -> Run:
    """Fills results: the model folder (weights, processor, test artefacts, results file; hftl/outputs.py)."""
    config, accelerator, result, decoded = run.config, run.accelerator, run.result, run.decoded
    results = {
        "task": run.task.name,
        "pipeline_tag": run.task.pipeline_tag,
        "model": config.model.model,
        "dataset": config.data.dataset,
        "strategy": config.strategy.strategy,
        "metric_for_best": run.main_metric,
        "labels": run.spec.label_names,
        "num_samples": run.sizes,
        "skipped_images": run.skipped_images,
        "trainable_parameters": run.adapted.trainable,
        "total_parameters": run.adapted.total,
        "train": {
            "seconds": round(result.train_seconds, 2),
            "samples_per_second": round(result.train_samples_per_second, 2),
            "epochs": result.state.epoch,
            "steps": result.state.step,
            "best_epoch": result.state.best_epoch,
            "weights": result.state.best_weights,
            "channels_last": result.channels_last,
            "torch_threads": run.threads[0],
            "decoded_images_mb": round(decoded.images.megabytes, 1) if decoded is not None else None,
        },
        "eval": {k.removeprefix("eval_"): v for k, v in result.best_metrics.items() if k.startswith("eval_")},
        "test": run.test_metrics,
        "history": result.state.history,
        **({"wise_ft": run.wise} if run.wise is not None else {}),
        "hardware": _hardware(accelerator),
        "config": config.to_dict(),
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out = Path(config.train.output_dir)
        run.test_evaluator.save_artifacts(out, "test")
        save_model(run.model, run.processor, config.model.model, config.strategy.merge_lora, out)
        plot_learning_curves(result.state.history, run.main_metric, out / CURVES_FILE)
        results["run_seconds"] = round(time.perf_counter() - run.started, 2)
        write_results(out, results)
        logger.info(f"saved {out}  (run {results['run_seconds']:.1f}s)")
    accelerator.wait_for_everyone()
    if config.train.report_to not in ("none", "", None):
        accelerator.end_training()
    run.results = results
    return run


def scale_learning_rate(adapted, base_lr: float) -> None:
    """Param groups built with base rate 1.0 (their lr are multipliers) get `base_lr`."""
    for group in adapted.param_groups:
        group["lr"] *= base_lr


def random_init(model, seed: int):
    """Same architecture, labels and config, fresh weights: the from-scratch baseline (`--from_scratch`). timm
    models get timm's own init, since transformers' generic init would shrink every conv to std 0.02."""
    torch.manual_seed(seed)
    fresh = type(model)(model.config)
    if hasattr(fresh, "timm_model"):
        import timm

        config = model.config
        native = timm.create_model(
            config.architecture, pretrained=False, num_classes=config.num_labels, **(config.model_args or {})
        )
        fresh.timm_model.load_state_dict(native.state_dict())
    return fresh


def publish(config: RunConfig, results: dict) -> None:
    """Export, push to the Hub and publish a Space, as the options ask (main process only)."""
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    if config.hub.export:  # before the push, which uploads the export folder and its Deploy section
        from hftl.export import export_model

        logger.info(f"export: {export_model(config.train.output_dir, config.hub.export, config.hub.export_quantize)}")
    if config.hub.push_to_hub:
        from hftl.hub.push import push_run

        url = push_run(
            config.train.output_dir,
            config.hub.hub_model_id,
            private=config.hub.hub_private,
            revision=config.hub.hub_revision,
            license=config.hub.license,
        )
        logger.info(f"pushed: {url}")
    if config.hub.publish_space:
        from hftl.spaces import publish_space

        model_id = config.hub.hub_model_id if config.hub.push_to_hub else None
        if model_id is None:
            raise ValueError("--publish_space needs --push_to_hub: the Space loads the model from the Hub.")
        logger.info(f"space: {publish_space(model_id, config.hub.publish_space, task=results['pipeline_tag'])}")


def _hardware(accelerator) -> str:
    if torch.cuda.is_available():
        return f"{accelerator.num_processes}× {torch.cuda.get_device_name(0)}"
    return f"{accelerator.num_processes} process(es) on CPU ({os.cpu_count()} cores, {platform.machine()})"


def _flat_hparams(config: RunConfig) -> dict:
    flat = {}
    for group, values in config.to_dict().items():
        for key, value in values.items():
            flat[f"{group}.{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat
