"""Data: media decoding, the Qwen2.5-Omni processor path, the qwen2_omni template and per-record encoding."""

from omni_fast.data.collator import OmniCollator
from omni_fast.data.config import DataConfig, load_data_config
from omni_fast.data.dataset import DataError, DatasetSample, OmniDataset, build_dataset, read_records
from omni_fast.data.demo import ensure_demo_data
from omni_fast.data.media import MediaError, VideoClip, load_audio, load_image, load_video, sample_video_indices
from omni_fast.data.processor import OmniProcessor
from omni_fast.data.template import DEFAULT_SYSTEM, IGNORE_INDEX, EncodedSample, encode_sample
from omni_fast.data.tiny_tokenizer import build_tiny_processor_dir

__all__ = [
    "DEFAULT_SYSTEM",
    "IGNORE_INDEX",
    "DataConfig",
    "DataError",
    "DatasetSample",
    "EncodedSample",
    "MediaError",
    "OmniCollator",
    "OmniDataset",
    "OmniProcessor",
    "VideoClip",
    "build_dataset",
    "build_tiny_processor_dir",
    "encode_sample",
    "ensure_demo_data",
    "load_audio",
    "load_data_config",
    "load_image",
    "load_video",
    "read_records",
    "sample_video_indices",
]
