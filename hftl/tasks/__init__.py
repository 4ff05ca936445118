"""Tasks: each module says only what differs between classification, detection and segmentation.

The shared trainer (`hftl.trainer`) talks to a task through this contract and nothing else:

    task.name                  "classification" | "detection" | "segmentation"
    task.pipeline_tag          "image-classification" | "object-detection" | "image-segmentation"
    task.main_metric           default metric for best-model selection / early stopping (e.g. "accuracy", "map_50")
    task.label_names(dataset_dict, data_args) -> list[str]   validates columns early (clear errors), returns labels
    task.load_local(path, data_args) -> DatasetDict   the task's local-folder format (imagefolder, COCO json, masks)
    task.load_model(model_args, id2label) -> (model, image_processor)
    task.prepare(dataset_dict, image_processor, data_args) -> DatasetDict with train/eval transforms set
    task.collate(examples) -> batch dict (tensors, or lists for detection targets)
    task.forward(model, batch) -> ModelOutput with `.loss`
    task.head_modules(model) -> list of module names that stay trainable under frozen strategies (and are saved
                                 as `modules_to_save` under LoRA)
    task.backbone(model) -> nn.Module (what `frozen-backbone` / `linear-probe` freeze)
    task.lora_targets(model) -> list of module-name suffixes for PEFT LoRA by model family
    task.new_evaluator(id2label) -> Evaluator

    optional: task.encode_labels(dataset_dict, names) (labels → one shared ClassLabel),
              task.deterministic_splits(data_args) (splits whose processed tensors the runner may cache),
              task.decoded_train_split(train, image_processor, data_args) -> Dataset | None (augmented train items
                  from images decoded once; the task's forward then takes uint8 pixel batches)

    Evaluator.update(accelerator, batch, outputs)   gathers across ranks itself (accelerator.gather_for_metrics)
    Evaluator.compute() -> dict[str, float]
    Evaluator.save_artifacts(output_dir, prefix)    confusion matrix / sample predictions PNG + JSON
"""

from importlib import import_module

TASK_MODULES = {
    "classification": "hftl.tasks.classification.task",
    "detection": "hftl.tasks.detection.task",
    "segmentation": "hftl.tasks.segmentation.task",
}


def get_task(name: str, config=None):
    """The task object for a run; a module's TASK may be a class (built with the run's config) or an instance."""
    if name not in TASK_MODULES:
        raise ValueError(f"Unknown task {name!r}; choose one of {sorted(TASK_MODULES)}.")
    task = import_module(TASK_MODULES[name]).TASK
    return task(config) if isinstance(task, type) else task
