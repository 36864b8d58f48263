"""Training entry point: ``python train.py [overrides]`` (Hydra)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import hydra

# Before Hydra or a DDP child configures logging: Lightning then keeps its own console handler
# (and does not propagate), so each of its lines is printed once, in every process.
import lightning  # noqa: F401  isort: skip
from omegaconf import DictConfig, OmegaConf, open_dict

from tumorseg.config import CONF_DIR
from tumorseg.core.console import quiet
from tumorseg.core.errors import DataError
from tumorseg.core.timing import timed
from tumorseg.sweep.launch import ddp_child_config, ddp_job, devices_tag
from tumorseg.tracking.client import git_commit, run_link
from tumorseg.training.precision import auto_precision, uses_gpu

log = logging.getLogger(__name__)


def _is_rank_zero() -> bool:
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


# Class paths that checkpoints written before the packages by stage (tumorseg 0.1) store in
# their config, and where those classes live now: resuming such a run builds the new ones.
MOVED_TARGETS = {
    "tumorseg.module.": "tumorseg.training.module.",
    "tumorseg.callbacks.": "tumorseg.tracking.callbacks.",
    "tumorseg.tracking.make_mlflow_logger": "tumorseg.tracking.client.make_mlflow_logger",
    "tumorseg.launch.": "tumorseg.sweep.launch.",
}


def current_targets(node: Any) -> Any:
    """``node`` (a plain config) with every ``_target_`` of ``MOVED_TARGETS`` at its new path."""
    if isinstance(node, dict):
        out = {k: current_targets(v) for k, v in node.items()}
        target = out.get("_target_")
        if isinstance(target, str):
            for old, new in MOVED_TARGETS.items():
                if target.startswith(old):
                    out["_target_"] = new + target[len(old) :]
        return out
    if isinstance(node, list):
        return [current_targets(v) for v in node]
    return node


def resume_config(cfg: DictConfig) -> tuple[DictConfig, str | None]:
    """For ``ckpt_path=...``: the run config stored in that checkpoint, and its MLflow run id."""
    from tumorseg.training.module import read_checkpoint

    path = cfg.ckpt_path
    ckpt = read_checkpoint(path, "cpu")
    stored = ckpt.get("tumorseg_config")
    if not stored:
        raise DataError(f"{path}: checkpoint holds no tumorseg config")
    stored = OmegaConf.create(current_targets(stored))
    stored.ckpt_path = path
    return stored, ckpt.get("mlflow_run_id")


def _sweep_tags() -> dict[str, str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    if hc.mode is None or hc.mode.name != "MULTIRUN":
        return {}
    return {"sweep": hc.sweep.dir, "sweep_job": str(hc.job.num)}


def kept_module(trainer, model, compile: bool = False):
    """The checkpoint the run kept (Lightning's ``best_model_path``), loaded for inference as
    ``tumorseg-predict`` loads it; the module in memory when nothing was saved."""
    from tumorseg.inference.predict import load_for_inference

    ckpt = trainer.checkpoint_callback
    kept = ckpt.best_model_path if ckpt is not None else ""
    return load_for_inference(kept, model.device, compile=compile) if kept else model


def whole_cases(datamodule, split: str) -> tuple[Iterator, bool]:
    """A split's whole cases and whether they are normalised: raw, as ``tumorseg-predict``
    reads them, or the store's volumes when ``data.root`` is a store (its source may be gone)."""
    cases = datamodule.raw_cases(split)
    if cases is None:
        return datamodule.iter_cases(split), True
    return cases, False


@timed("test")
def run_test_stage(cfg: DictConfig, trainer, model, datamodule, logger) -> dict[str, float]:
    """Predict the test cases volume by volume with the kept checkpoint, from the raw cases as
    ``tumorseg-predict`` would (store volumes when ``data.root`` is a store); log the scores."""
    from itertools import islice

    from tumorseg.evaluation.test_stage import test_stage
    from tumorseg.training.module import should_compile

    compiled = should_compile(cfg.model.get("compile", False), model.device.type, 0)
    module = kept_module(trainer, model, compiled)
    test_cases, normalised = whole_cases(datamodule, "test")
    val_cases, _ = whole_cases(datamodule, "val")
    if normalised:
        log.info("data.root is a store: the test stage predicts its (normalised) volumes")
    overlays = islice(val_cases, cfg.get("overlay_cases", 2))
    means = test_stage(
        module,
        test_cases,
        overlays,
        logger,
        trainer.global_step,
        normalised=normalised,
        save_predictions=cfg.get("test_predictions", True),
        hd95=cfg.get("test_hd95", "pooled"),
    )
    log.info("test (case-level): %s", {k: round(v, 4) for k, v in means.items() if "dice" in k})
    return means


CASE_LEVEL = ("val/case_dice", "predict/seconds_per_case")  # need the validation cases predicted


def objective_names(cfg: DictConfig) -> list[str]:
    """``optimized_metric`` as a list (one name, or several for a multi-objective study)."""
    names = cfg.get("optimized_metric") or "val/dice_mean"
    return [names] if isinstance(names, str) else [str(n) for n in names]


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and getattr(HydraConfig.get().mode, "name", "") == "MULTIRUN"


@timed("validation")
def validate_cases(cfg: DictConfig, trainer, model, datamodule, logger) -> dict[str, float]:
    """Predict the validation patients volume by volume with the kept checkpoint (the test
    stage's path), log their case-level Dice, its noise and the seconds per case."""
    from tumorseg.evaluation.test_stage import case_dice, validation_scores

    module = kept_module(trainer, model)
    module.eval()
    cases, normalised = whole_cases(datamodule, "val")
    table = case_dice(module, cases, normalised=normalised)
    if table.empty:
        return {}
    scores = validation_scores(table)
    if logger is not None:
        logger.log_metrics(scores, step=trainer.global_step)
    log.info(
        "validation (case-level, %d patients): dice_mean %.4f ± %.4f, %.2f s per case",
        table["case_id"].nunique(),
        scores["val/case_dice_mean"],
        scores.get("val/case_dice_mean_stderr", float("nan")),
        scores["predict/seconds_per_case"],
    )
    return scores


def objective(cfg: DictConfig, trainer, measured: dict[str, float], score: Any) -> Any:
    """What the run returns to a sweep: a ``Score`` per ``optimized_metric`` (a list for several),
    with its standard error where the run measured one. ``val/dice_mean`` is the kept epoch's
    pooled value (``score``), as the pruner saw it each epoch."""
    from tumorseg.sweep.objective import Score

    names = objective_names(cfg)
    values = []
    for name in names:
        if name == "val/dice_mean" and score is not None:
            value = float(score)
        elif name in measured:
            value = measured[name]
        elif name in trainer.callback_metrics:
            value = float(trainer.callback_metrics[name])
        else:
            if not trainer.is_global_zero:
                return None
            raise DataError(
                f"optimized_metric {name!r}: the run measured no such metric (known: "
                "val/dice_mean, val/case_dice_mean, model/params, predict/seconds_per_case, "
                "or any logged val/* metric)"
            )
        values.append(Score(value, measured.get(f"{name}_stderr"), name))
    return values[0] if len(values) == 1 else values


@timed("logging")
def log_kept_model(cfg: DictConfig, trainer, logger) -> None:
    """The kept checkpoint as the run's MLflow model ``model`` (``tumorseg.tracking.mlflow_model``),
    registered as ``registered_model_name`` when that is set."""
    from pathlib import Path

    from tumorseg.tracking.registry import log_model

    ckpt = trainer.checkpoint_callback
    kept = ckpt.best_model_path if ckpt is not None else ""
    if not kept or not Path(kept).is_file():
        return
    name = cfg.get("registered_model_name")
    info = log_model(kept, logger.run_id, logger._tracking_uri, name)
    log.info("MLflow model %s%s", info.model_uri, f", registered as {name}" if name else "")


def report_phases(phases, logger, trainer) -> None:
    """Where the run's time went: a table on the console and ``time/*`` metrics in MLflow
    (rank 0; ``tumorseg.core.timing``)."""
    from tumorseg.core import timing

    values = phases.finish()
    timing.end()
    if not trainer.is_global_zero:
        return
    log.info("where the time went (s):\n%s", timing.table(values))
    if logger is not None:
        logger.log_metrics(phases.metrics(values), step=trainer.global_step)


def run(cfg: DictConfig) -> Any:
    """Train (and test) as ``cfg`` says; returns the kept checkpoint's ``optimized_metric``
    (``tumorseg.sweep.objective.Score``; a list of them for several metrics), ``val/dice_mean`` by
    default (its epoch's; ``conf/callbacks/default.yaml`` says which epoch a run keeps). In a
    multirun, or when a metric needs it, the validation patients are also predicted volume by
    volume (``val/case_dice_*``, the objective's standard error, ``predict/seconds_per_case``)."""
    import lightning as L

    from tumorseg.core import timing

    phases = timing.begin()
    quiet()
    run_id = None
    if cfg.get("ckpt_path"):
        cfg, run_id = resume_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    accelerator = cfg.trainer.get("accelerator", "auto")
    with open_dict(cfg):
        if cfg.trainer.get("precision") == "auto":
            cfg.trainer.precision = auto_precision(accelerator)
        if cfg.trainer.get("sync_batchnorm") and not uses_gpu(accelerator):
            log.warning(
                "sync_batchnorm needs GPUs; each CPU process keeps its own batch statistics"
            )
            cfg.trainer.sync_batchnorm = False
    config = OmegaConf.to_container(cfg, resolve=True)

    datamodule = hydra.utils.instantiate(cfg.data)
    if _is_rank_zero():
        datamodule.prepare_data()
    model = hydra.utils.instantiate(cfg.model)
    model.config = config
    model.preprocessing = datamodule.preprocessing()  # the store's, which checkpoints record
    callbacks = [hydra.utils.instantiate(c) for c in cfg.get("callbacks", {}).values() if c]

    logger = None
    if cfg.get("logger") and cfg.logger.get("mlflow"):
        tags = {
            "variant": cfg.model.name,
            "data_source": cfg.data.source,
            "seed": cfg.seed,
            "git_commit": git_commit(),
            "data_manifest": datamodule.manifest()["hash"],
            "precision": cfg.trainer.precision,
            **_sweep_tags(),
            **(cfg.get("tags") or {}),
        }
        logger = hydra.utils.instantiate(cfg.logger.mlflow, run_id=run_id, tags=tags)

    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=logger or False)
    if logger is not None:
        logger.tags = {**(logger.tags or {}), "devices": devices_tag(trainer)}  # before the run
    log.info("precision %s, variant %s", cfg.trainer.precision, cfg.model.name)
    if logger is not None and _is_rank_zero():
        log.info("%s", run_link(logger))
    phases.startup_done()
    if cfg.get("train", True):
        with ddp_job(config, cfg.paths.output_dir), timing.phase("train"):
            trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    # monitored: the kept (best) epoch's score; not monitored (the default): None, and the
    # last validation's value below is the kept epoch's
    score = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
    measured: dict[str, float] = {}
    try:
        if trainer.is_global_zero:
            measured["model/params"] = float(sum(p.numel() for p in model.net.parameters()))
            if logger is not None:
                logger.log_metrics({"model/params": measured["model/params"]})
        names = objective_names(cfg)
        case_level = any(n.startswith(CASE_LEVEL) for n in names) or _in_multirun()
        fitted = cfg.get("train", True) and not trainer.fast_dev_run
        if case_level and fitted and trainer.is_global_zero:
            measured.update(validate_cases(cfg, trainer, model, datamodule, logger))
        if logger is not None and trainer.is_global_zero and cfg.get("log_model", True):
            log_kept_model(cfg, trainer, logger)
        if cfg.get("test") and not trainer.fast_dev_run and trainer.is_global_zero:
            run_test_stage(cfg, trainer, model, datamodule, logger)
    except BaseException:
        # Lightning closed the run as FINISHED after fit; without its model or test results
        # it is not
        if logger is not None and trainer.is_global_zero:
            logger.experiment.set_terminated(logger.run_id, "FAILED")
        raise
    report_phases(phases, logger, trainer)
    if score is None:
        score = trainer.callback_metrics.get("val/dice_mean")
    if logger is not None and _is_rank_zero():
        log.info("%s", run_link(logger))
    if score is None and objective_names(cfg) == ["val/dice_mean"]:
        return None
    return objective(cfg, trainer, measured, score)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> Any:
    try:
        return run(cfg)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def _ddp_child(config: dict[str, Any]) -> Any:
    """A DDP child of a job: run that job's resolved config (no Hydra, no sweep)."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    log.info(
        "DDP rank %s of the job in %s", os.environ["LOCAL_RANK"], config["paths"]["output_dir"]
    )
    try:
        return run(OmegaConf.create(config))
    except Exception as err:
        # a pruned trial stops every rank; exit 0, or Lightning's watcher kills the parent
        if type(err).__name__ == "TrialPruned":
            log.info("DDP rank %s: %s", os.environ["LOCAL_RANK"], err)
            return None
        raise


def main() -> Any:
    child = ddp_child_config()
    if child is not None:
        return _ddp_child(child)
    return _hydra_main()


if __name__ == "__main__":
    main()
