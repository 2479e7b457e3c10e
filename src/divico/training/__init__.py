"""Training: DiViCo fine-tuning with LoRA + KL (Algorithm 1), DeCo projector training and the Fig. 8 variants.

>>> from divico.training import TrainingConfig, train
>>> config = TrainingConfig(data_path="train.json", image_folder="images", output_dir="out",
...                         compression=divico.CompressionConfig(method="divico", keep_ratio=0.111, layer=2))
>>> result = train(model, processor, config)
>>> divico.load_compressor(fresh_base_model, result.output_dir)
"""

from divico.training.data import (
    DataError,
    LeftPaddingCollator,
    LlavaJsonDataset,
    encode_conversation,
    encode_visual_words,
    iter_json_records,
    parse_record,
)
from divico.training.trainer import (
    DiViCoTrainer,
    TrainingConfig,
    TrainResult,
    build_training_arguments,
    learning_curve,
    lora_target_regex,
    prepare_model_for_training,
    train,
    visual_word_loss,
)

__all__ = [
    "DataError",
    "DiViCoTrainer",
    "LeftPaddingCollator",
    "LlavaJsonDataset",
    "TrainResult",
    "TrainingConfig",
    "build_training_arguments",
    "encode_conversation",
    "encode_visual_words",
    "iter_json_records",
    "learning_curve",
    "lora_target_regex",
    "parse_record",
    "prepare_model_for_training",
    "train",
    "visual_word_loss",
]
