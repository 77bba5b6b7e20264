"""iet_core: train diffusion models with IET-AGC(+) memorization mitigation, and measure
how much they copy their training data.

    from iet_core import demo_config, train
    run = train(demo_config("iet-agc"), runs_root="runs")
    run.export()
"""
from .config import (AGCConfig, ConfigError, DataConfig, EvalConfig, MethodConfig, ModelConfig, MSRConfig,
                     RunConfig, TAAConfig, TrainConfig, demo_config, method_for_mode)
from .data import DataError, ImageDataset, load_dataset
from .runs import Run, list_runs
from .train import TrainControl, Trainer, TrainingDiverged, train
from . import text2image  # registers the text-to-image family (iet_core.families) with the engine

__all__ = ["AGCConfig", "ConfigError", "DataConfig", "EvalConfig", "MethodConfig", "ModelConfig", "MSRConfig",
           "RunConfig", "TAAConfig", "TrainConfig", "demo_config", "method_for_mode", "DataError", "ImageDataset",
           "load_dataset", "Run", "list_runs", "TrainControl", "Trainer", "TrainingDiverged", "train"]
