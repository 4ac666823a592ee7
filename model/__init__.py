"""Pixtral in pure PyTorch: model, tensor-parallel layers, weight loading and the inference engine.

Importing this package never imports ray, fastapi or pydantic.
"""

from model.config import ModelArgs, VisionEncoderArgs, load_model_args
from model.loader import load_model
from model.pixtral import PixtralModel

__all__ = ["ModelArgs", "VisionEncoderArgs", "PixtralModel", "load_model", "load_model_args"]
