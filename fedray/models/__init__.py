"""Models clients train, and the flat-vector view of their exchanged parameters."""

from fedray.models.factory import ParamView, build_model, count_model_parameters

__all__ = ["ParamView", "build_model", "count_model_parameters"]
