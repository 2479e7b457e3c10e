"""Training recipe of divico's default model: one resumable command retrains every shipped checkpoint.

Stages (each writes only its trained parts and is skipped when already finished; an interrupted stage resumes
from its last Trainer checkpoint):

1. ``stage1``: projector alignment on the caption conversations (projector only), after folding a feature
   standardisation into the projector (:func:`calibrate_projector`) and pre-aligning it to the word embeddings
   of what each patch shows (:func:`align_projector`, no LLM forward, a few minutes).
2. ``stage2``: instruction tuning on every mini-benchmark style (LoRA on the LLM + projector), on multi-turn
   conversations that ask eight questions per image (the 144 visual tokens are paid for once per eight answers),
   plus the visual word loss (:func:`divico.training.visual_word_loss`): at every visual token the LM head should
   name what the patch shows (:func:`scene_patch_words`), 144 dense targets per image next to eight answers.
   The result is the uncompressed *base* model that the demo and every compressor start from (LoRA merged).
3. ``compressors/<method>-<keep>``: DiViCo and DeCo at the paper's rates 16.7% / 11.1% / 6.7% of the visual
   tokens kept, and the ablation variants (a: FastV + LoRA, b: deterministic encoder) at 11.1%. Each is trained
   until its answer loss on held-out validation records stops improving (early stopping, ``compressor_patience``
   evaluations every ``compressor_eval_steps`` steps, at most ``compressor_steps``); its folder holds the best
   evaluation's weights, ``learning_curve.json`` and ``training_summary.json`` (steps run, best step).

Stages 1 and 2 use DeCo at ``keep_ratio=1.0`` as the training vehicle: pooling a grid to itself is the identity,
so this is exactly the uncompressed model with a trainable projector, trained by the same code as every method.
The package ships stages 2 and 3 (:func:`export_assets`); stage 1 stays in the run folder.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from divico.api import remove_compression
from divico.checkpoint import load_compressor
from divico.config import CompressionConfig
from divico.lora import merge_lora
from divico.training import TrainingConfig, train
from divico.training.trainer import TRAINING_CONFIG_NAME
from PIL import Image
from torch import nn

from divico_testbed.data import (
    benchmark_data_current,
    load_scenes,
    multiturn_file_name,
    write_benchmark_splits,
    write_multiturn_training,
)
from divico_testbed.data.scenes import GRID_SIZE
from divico_testbed.default_model import build_default_model, num_visual_tokens

ASSETS_DIR = Path(__file__).resolve().parent / "assets" / "default"
#: The paper's compression rates 83.3% / 88.9% / 93.3%, as shares of visual tokens kept.
PAPER_KEEP_RATIOS: dict[str, float] = {"keep16.7": 1 / 6, "keep11.1": 1 / 9, "keep6.7": 1 / 15}
ABLATION_TAG = "keep11.1"
#: The stage-3 run trained with the pre-Eq.-8 KL (mean over dimensions), an ablation row at ABLATION_TAG.
KL_MEAN_ABLATION = "divico_klmean"
ATTENTION_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
#: A compressor's record of the stage-2 base it was trained on (``{"stage2_steps": N}``), read by
#: :func:`stage_finished` when a run is resumed.
BASE_RECORD_NAME = "recipe_base.json"
#: What a run folder holds that :func:`export_assets` does not ship: Trainer checkpoints and the base records,
#: the state of resuming a run (the shipped ``recipe.json`` records the stage-2 and compressor steps).
RUN_ONLY_FILES = frozenset({"checkpoints", BASE_RECORD_NAME})
#: ``base_model`` of the shipped checkpoints' metadata: the default model as this package builds it (it is cached
#: in ``<cache>/default-base-<image_size>``, :func:`divico_testbed.default_model.default_model_dir`).
PORTABLE_BASE_MODEL = "divico-testbed:default-base-{image_size}"
#: Paths of the training machine in a run's ``recipe.json`` and ``training_config.json`` (see :func:`portable_path`).
RECIPE_PATH_KEYS = ("output_dir", "stage2_init")
TRAINING_PATH_KEYS = ("data_path", "image_folder", "output_dir", "init_from", "eval_data_path")
#: The generated validation conversations (scenes disjoint from training) that stage 3's subsets are taken from.
VALIDATION_FILE = "llava_validation.json"


@dataclass
class RecipeConfig:
    """Sizes and hyper-parameters of the default model's training.

    The defaults are what the shipped checkpoints were trained with on 2 CPU cores (~6 min projector calibration,
    alignment and stage 1; ~60 min for stage 2 at ~10-12 s per step; ~24 min for the eight compressors at ~3 min
    each); the shipped stage 2 then continued for 250 steps (``stage2_init``, 43 min), for 360 more with
    ``multiturn_choice_orders=3`` (91 min) and for 180 more once multiple choice was answered with the option's
    text (38 min), each time with its compressors retrained (the last time for 90 steps, now the default; before,
    30). Scale the step counts up on a GPU or for better accuracy (``--steps-scale``).
    """

    output_dir: Path = Path("runs/default-recipe")
    image_size: int = 168
    seed: int = 0
    data_sizes: dict[str, dict[str, int]] | None = None
    batch_size: int = 4
    stage1_steps: int = 30
    stage1_lr: float = 1e-3
    stage2_steps: int = 300
    stage2_lr: float = 1e-3
    stage2_lora_r: int = 16
    #: Warm start of stage 2: a trained stage-2 folder (e.g. the shipped ``assets/default/stage2``) whose projector
    #: and LoRA it continues from (fresh optimiser and schedule, the init's seed + 1 for a new data order), so CPU
    #: sessions can add steps to a finished run.
    stage2_init: Path | None = None
    #: Weight of the visual word loss in stage 2 (every visual token names what it shows; 0: off), and the weight
    #: of background patches within it (objects and signs: 1).
    visual_word_weight: float = 1.0
    visual_word_background_weight: float = 0.2
    #: Question turns per image in stage 2's multi-turn conversations (0: the single-question file).
    multiturn_turns: int = 8
    #: Option orders in which stage 2 asks each multiple-choice question of a conversation (1: once); more orders
    #: show the same content behind different letters (:func:`divico_testbed.data.multiturn_conversation`). Answers are
    #: option texts (:data:`divico_testbed.data.benchmarks.OPTION_HINT`), so this only teaches order invariance.
    multiturn_choice_orders: int = 1
    #: Standardise the vision features and match text-embedding norms in the projector before stage 1.
    calibrate_projector: bool = True
    calibration_images: int = 64
    #: Projector pre-alignment to scene ground-truth word embeddings before stage 1 (0 steps: skip).
    alignment_steps: int = 400
    alignment_images: int = 600
    #: Upper bound on each compressor run's steps: with ``compressor_patience`` it stops earlier once its validation
    #: answer loss no longer improves.
    compressor_steps: int = 90
    compressor_lr: float = 2e-4
    #: Stage 3's validation: the first ``compressor_eval_records`` conversations of the generated validation split
    #: (:data:`VALIDATION_FILE`, a fixed shuffled order; 32 keeps an evaluation to ~8 forward batches on a CPU), the
    #: answer loss on them every ``compressor_eval_steps`` steps, and training stops after ``compressor_patience``
    #: evaluations in a row without a new best (None: no validation, the last step's weights are kept).
    compressor_eval_records: int = 32
    compressor_eval_steps: int = 10
    compressor_patience: int | None = 3
    compressor_lora_r: int = 8
    #: LoRA dropout in every stage (0.05 costs 29% of a CPU step, benchmarks/training_step_time.py).
    lora_dropout: float = 0.0
    layer: int = 2
    beta: float = 0.02
    encoder_hidden_size: int | None = 288
    keep_ratios: dict[str, float] = field(default_factory=lambda: dict(PAPER_KEEP_RATIOS))
    threads: int | None = None
    #: bf16 autocast in every training stage (1.2x faster than float32 on this CPU, benchmarks/training_step_time.py;
    #: trained tensors stay float32).
    bf16: bool = True

    def __post_init__(self) -> None:
        for name in ("compressor_steps", "compressor_eval_records", "compressor_eval_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        patience = self.compressor_patience
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
            raise ValueError(
                f"compressor_patience must be None (no early stopping) or an integer >= 1, got {patience!r}."
            )
        if self.stage2_init is not None and not (Path(self.stage2_init) / "config.json").is_file():
            raise FileNotFoundError(
                f"stage2_init={str(self.stage2_init)!r} is not a trained stage-2 folder (no config.json)."
            )

    def scaled(self, factor: float) -> RecipeConfig:
        if factor <= 0:
            raise ValueError(f"steps scale must be > 0, got {factor}.")
        out = RecipeConfig(**asdict(self))
        out.output_dir = Path(self.output_dir)
        for name in ("stage1_steps", "stage2_steps", "compressor_steps"):
            setattr(out, name, max(1, round(getattr(self, name) * factor)))
        return out


def compressor_runs(config: RecipeConfig) -> dict[str, CompressionConfig]:
    """Name -> compression config of every stage-3 run.

    DiViCo, DeCo and variant a (FastV's selection + LoRA, a trained FastV) at every rate; at the ablation rate
    also variant b (deterministic encoder) and ``divico_klmean`` (the KL averaged over dimensions instead of
    Eq. 8's sum, the pre-fix objective, to measure what the fix changes).
    """
    runs: dict[str, CompressionConfig] = {}
    for tag, ratio in config.keep_ratios.items():
        runs[f"divico-{tag}"] = CompressionConfig(
            "divico", keep_ratio=ratio, layer=config.layer, encoder_hidden_size=config.encoder_hidden_size
        )
        runs[f"deco-{tag}"] = CompressionConfig("deco", keep_ratio=ratio)
        runs[f"variant_a-{tag}"] = CompressionConfig("fastv", keep_ratio=ratio, layer=config.layer)
    if ABLATION_TAG in config.keep_ratios:
        ratio = config.keep_ratios[ABLATION_TAG]
        runs[f"variant_b-{ABLATION_TAG}"] = CompressionConfig(
            "divico", keep_ratio=ratio, layer=config.layer, encoder="deterministic",
            encoder_hidden_size=config.encoder_hidden_size,
        )
        runs[f"{KL_MEAN_ABLATION}-{ABLATION_TAG}"] = CompressionConfig(
            "divico", keep_ratio=ratio, layer=config.layer, encoder_hidden_size=config.encoder_hidden_size,
            kl_reduction="mean",
        )
    return runs


@torch.no_grad()
def _patch_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """What a "default"-strategy LLaVA projector receives: (N, tokens, D) float32, CLS dropped."""
    dtype = model.model.multi_modal_projector.linear_1.weight.dtype
    hidden = model.model.vision_tower(pixel_values.to(dtype), output_hidden_states=True).hidden_states
    return hidden[model.config.vision_feature_layer][:, 1:].float()


@torch.no_grad()
def calibrate_projector(model: nn.Module, pixel_values: torch.Tensor) -> dict[str, float]:
    """Fold feature standardisation and a norm match into a LLaVA projector (in place, exact affine algebra).

    DINOv2's hidden states (no LayerNorm) have per-dimension standard deviations spread over an order of magnitude
    (block 7, which the default model reads: ~0.04 to ~0.3) and the freshly initialised projector maps them to
    vectors of another norm than the LLM's word embeddings (block 7: 0.8 vs 3.2). This
    rewrites ``linear_1`` so it sees each feature dimension standardised over ``pixel_values`` (``W/sigma``,
    ``b - W mu/sigma``), then scales ``linear_2`` so projected tokens have the mean word-embedding norm.

    Parameters
    ----------
    model : nn.Module
        A ``LlavaForConditionalGeneration`` (``vision_feature_select_strategy="default"``).
    pixel_values : torch.Tensor
        Calibration images, shape (N, 3, H, W), as the processor produces them.

    Returns
    -------
    dict
        ``feature_std_min``, ``feature_std_max``, ``token_norm_before``, ``token_norm_after``, ``embedding_norm``.
    """
    projector = model.model.multi_modal_projector
    features = _patch_features(model, pixel_values).flatten(0, 1)  # (N * tokens, D)
    mean, std = features.mean(dim=0), features.std(dim=0).clamp_min(1e-6)
    before = projector(features.to(projector.linear_1.weight.dtype)).float().norm(dim=-1).mean()
    weight = projector.linear_1.weight.float()
    projector.linear_1.bias.copy_(projector.linear_1.bias.float() - weight @ (mean / std))
    projector.linear_1.weight.copy_(weight / std)
    projected = projector(features.to(projector.linear_1.weight.dtype)).float().norm(dim=-1).mean()
    target = model.get_input_embeddings().weight.float().norm(dim=-1).mean()
    scale = target / projected
    projector.linear_2.weight.mul_(scale)
    projector.linear_2.bias.mul_(scale)
    after = projector(features.to(projector.linear_1.weight.dtype)).float().norm(dim=-1).mean()
    return {"feature_std_min": float(std.min()), "feature_std_max": float(std.max()),
            "token_norm_before": float(before), "token_norm_after": float(after), "embedding_norm": float(target)}


def _calibration_pixels(processor: Any, data: Path, count: int) -> torch.Tensor:
    paths = sorted((data / "images" / "train" / "caption").glob("*.png"))[:count]
    if not paths:
        raise FileNotFoundError(f"no caption training images under {data / 'images' / 'train' / 'caption'}")
    images = [Image.open(path).convert("RGB") for path in paths]
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


def _word_embedding(model: nn.Module, tokenizer: Any, words: str) -> torch.Tensor:
    """Mean input embedding of the tokens of ``" " + words`` (as the words appear mid-sentence), shape (D,)."""
    ids = tokenizer(" " + words, add_special_tokens=False)["input_ids"]
    return model.get_input_embeddings().weight[ids].float().mean(dim=0)


def scene_patch_words(scene: Any, grid: int) -> list[tuple[tuple[str, ...], bool]]:
    """What every patch of a rendered scene shows, from its ground truth, in raster order.

    A patch whose centre lies on an object shows its colour and shape words (``("red", "square")``); on a sign,
    its colour and ``"sign"``; elsewhere, the background colour and ``"background"``. A tiny object that covers no
    patch centre is given its nearest patch.

    Returns
    -------
    list of (words, on_item)
        ``grid * grid`` entries; ``on_item`` is True on objects and signs.
    """
    background = ((scene.background, "background"), False)
    patches: list[tuple[tuple[str, ...], bool]] = [background] * (grid * grid)
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    rows, cols = torch.meshgrid(centres, centres, indexing="ij")
    items = [(o.x, o.y, max(o.size / 2, 0.5 / grid), (o.color, o.shape)) for o in scene.objects]
    # A sign spans most of its grid cell's width.
    items += [(s.x, s.y, 1.0 / (2 * GRID_SIZE), (s.color, "sign")) for s in scene.signs]
    for x, y, radius, words in items:
        inside = ((cols - x) ** 2 + (rows - y) ** 2 <= radius**2).flatten()
        if not bool(inside.any()):  # a tiny object: its nearest patch
            inside[int(min(y * grid, grid - 1)) * grid + int(min(x * grid, grid - 1))] = True
        for index in torch.nonzero(inside).flatten().tolist():
            patches[index] = (words, True)
    return patches


def scene_patch_targets(model: nn.Module, tokenizer: Any, scene: Any, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Word-embedding targets for every patch of a rendered scene: the mean embedding of :func:`scene_patch_words`.

    Returns
    -------
    targets : torch.Tensor
        Shape (grid * grid, D), patches in raster order.
    on_item : torch.Tensor
        Shape (grid * grid,) bool, True on objects and signs.
    """
    patches = scene_patch_words(scene, grid)
    embeddings: dict[tuple[str, ...], torch.Tensor] = {}
    for words, _ in patches:
        if words not in embeddings:
            embeddings[words] = torch.stack([_word_embedding(model, tokenizer, w) for w in words]).mean(dim=0)
    targets = torch.stack([embeddings[words] for words, _ in patches])
    return targets, torch.tensor([on_item for _, on_item in patches])


def write_visual_words(source: Path, target: Path, data: Path, grid: int, background_weight: float = 0.2) -> int:
    """Copy a LLaVA training file of scene conversations, adding each record's ``"visual_words"``.

    Object and sign patches get weight 1, background patches ``background_weight`` (:func:`scene_patch_words`).

    Returns
    -------
    int
        Number of records written.
    """
    if not 0 <= background_weight < float("inf"):
        raise ValueError(f"background_weight must be a finite number >= 0, got {background_weight!r}.")
    scenes = load_scenes(data, "train")
    records = json.loads(Path(source).read_text())
    for record in records:
        scene = scenes.get(record.get("image"))
        if scene is None:
            raise KeyError(f"no scene for image {record.get('image')!r} of record {record.get('id')!r} in {data}")
        record["visual_words"] = [" ".join(words) if on_item else [" ".join(words), background_weight]
                                  for words, on_item in scene_patch_words(scene, grid)]
    Path(target).write_text(json.dumps(records))
    return len(records)


def align_projector(
    model: nn.Module, processor: Any, data: Path, images: int = 800, steps: int = 400, lr: float = 1e-3,
    batch_tokens: int = 4096, seed: int = 0,
) -> dict[str, float]:
    """Pre-align the projector so visual tokens land on the word embeddings of what the patch shows.

    The frozen vision tower's features of ``images`` training scenes are computed once; the projector is then
    trained alone (no LLM forward) to map each patch to :func:`scene_patch_targets` (MSE, item patches weighted
    4x), a cheap start for the end-to-end stages. Measured on the default model (block-7 features, data format 2):
    held-out cosine 0.92 on object patches, 0.94 on background (0.04 before). Measured earlier (last-block features,
    smaller objects): the untuned LLM does not read such tokens as words (docs/results.md, *Diagnosis*).
    The last 10% of the images are held out.

    Returns
    -------
    dict
        ``images``, held-out ``cosine_items`` / ``cosine_background`` (mean cosine between projected tokens and
        their targets) and the same before alignment (``*_before``).
    """
    scenes = sorted(load_scenes(data, "train").items())[:images]
    if len(scenes) < 10:
        raise ValueError(f"align_projector needs >= 10 training scenes under {data}, found {len(scenes)}")
    projector = model.model.multi_modal_projector
    dtype = projector.linear_1.weight.dtype
    features, targets, on_item = [], [], []
    grid = round(model.config.image_seq_length**0.5)
    tokenizer = processor.tokenizer
    with torch.no_grad():
        for start in range(0, len(scenes), 32):
            chunk = scenes[start:start + 32]
            pixels = processor.image_processor([Image.open(data / path).convert("RGB") for path, _ in chunk],
                                               return_tensors="pt")["pixel_values"]
            features.append(_patch_features(model, pixels).flatten(0, 1))
            for _, scene in chunk:
                target, item = scene_patch_targets(model, tokenizer, scene, grid)
                targets.append(target)
                on_item.append(item)
    x, y, item = torch.cat(features), torch.cat(targets), torch.cat(on_item)
    held_out = (len(scenes) - max(1, len(scenes) // 10)) * grid * grid
    weights = 1.0 + 3.0 * item.float()

    def cosines() -> dict[str, float]:
        with torch.no_grad():
            out = projector(x[held_out:].to(dtype)).float()
        cos = nn.functional.cosine_similarity(out, y[held_out:], dim=-1)
        return {"cosine_items": float(cos[item[held_out:]].mean()),
                "cosine_background": float(cos[~item[held_out:]].mean())}

    before = cosines()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(projector.parameters(), lr=lr)
    for _ in range(steps):
        index = torch.randint(0, held_out, (batch_tokens,), generator=generator)
        out = projector(x[index].to(dtype)).float()
        loss = (weights[index] * ((out - y[index]) ** 2).mean(dim=-1)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    projector.zero_grad(set_to_none=True)
    after = cosines()
    return {"images": float(len(scenes)), **after, **{f"{k}_before": v for k, v in before.items()}}


def load_base(stage_dir: Path, image_size: int = 168, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """The default model with a trained stage (projector and LoRA, merged) applied, uncompressed."""
    model, processor = build_default_model(image_size=image_size, torch_dtype=dtype)
    load_compressor(model, stage_dir)
    remove_compression(model)
    merge_lora(model)
    return model.eval(), processor


def load_trained_default(assets_dir: str | Path | None = None, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """The trained default model (uncompressed) from the shipped assets (or a recipe output's ``export``)."""
    root = Path(assets_dir) if assets_dir is not None else ASSETS_DIR
    stage = root / "stage2"
    if not (stage / "config.json").is_file():
        raise FileNotFoundError(
            f"No trained default model at {root}; run `divico retrain-default --export` to train and export it."
        )
    meta = json.loads((root / "recipe.json").read_text()) if (root / "recipe.json").is_file() else {}
    return load_base(stage, image_size=int(meta.get("image_size", 168)), dtype=dtype)


def stage_finished(directory: Path, steps: int | None = None, base: dict[str, Any] | None = None) -> bool:
    """A stage is finished when its outputs exist, it ran at least ``steps`` steps and on the same ``base``
    (what its :data:`BASE_RECORD_NAME` file records).

    A stage that ran fewer steps (a larger ``--steps-scale``) is reopened: its outputs are removed and training
    resumes from its last Trainer checkpoint. A stage trained on another base stage is retrained.
    """
    config_path, training_path = directory / "config.json", directory / TRAINING_CONFIG_NAME
    if not (config_path.is_file() and training_path.is_file()):
        return False
    ran = int(json.loads(training_path.read_text()).get("max_steps", -1))
    record = directory / BASE_RECORD_NAME
    recorded = json.loads(record.read_text()) if record.is_file() else {}
    if (steps is None or ran >= steps) and (base is None or recorded == base):
        return True
    config_path.unlink()
    training_path.unlink()
    if base is not None and recorded != base:
        shutil.rmtree(directory / "checkpoints", ignore_errors=True)
    return False


def warm_start_seed(config: RecipeConfig) -> int | None:
    """Stage 2's seed: the recipe's, or for a warm start its init's seed + 1, so that a chain of warm starts
    never replays the batch order of the run it continues."""
    if config.stage2_init is None:
        return None
    recorded = Path(config.stage2_init) / TRAINING_CONFIG_NAME
    previous = json.loads(recorded.read_text()).get("seed", config.seed) if recorded.is_file() else config.seed
    return int(previous) + 1


def _stage_steps(directory: Path) -> int:
    return int(json.loads((directory / TRAINING_CONFIG_NAME).read_text())["max_steps"])


def stage_training_config(
    data: Path, image_folder: Path, out: Path, compression: CompressionConfig, steps: int, lr: float, lora_r: int,
    config: RecipeConfig, lora_targets: list[str] | None, beta: float, visual_word_weight: float = 0.0,
    init_from: Path | None = None, seed: int | None = None, eval_data: Path | None = None,
) -> TrainingConfig:
    """The :class:`divico.training.TrainingConfig` of one recipe stage (with ``eval_data``: validated every
    ``config.compressor_eval_steps`` steps, a checkpoint at each evaluation, early stopping after
    ``config.compressor_patience`` evaluations without a new best, the best evaluation's weights kept)."""
    validation: dict[str, Any] = {"save_steps": 10}
    if eval_data is not None:
        validation = {"eval_data_path": eval_data, "eval_steps": config.compressor_eval_steps,
                      "early_stopping_patience": config.compressor_patience}
    return TrainingConfig(
        data_path=data, image_folder=image_folder, output_dir=out, compression=compression, beta=beta,
        visual_word_weight=visual_word_weight, lora_r=lora_r, lora_alpha=2 * max(lora_r, 1),
        lora_dropout=config.lora_dropout, lora_target_modules=lora_targets,
        learning_rate=lr, max_steps=steps, per_device_batch_size=config.batch_size,
        seed=config.seed if seed is None else seed,
        logging_steps=5, save_total_limit=1, warmup=0.05, bf16=config.bf16, init_from=init_from, **validation,
    )


def compressor_training_config(
    config: RecipeConfig, data: Path, out: Path, compression: CompressionConfig
) -> TrainingConfig:
    """The training settings of a stage-3 compressor run on the recipe's data folder ``data``: the recipe's
    compressor steps (an upper bound with early stopping), LoRA on the attention projections, and with
    ``config.compressor_patience`` the validation subset of :func:`validation_subset`."""
    eval_data = None
    if config.compressor_patience is not None:
        eval_data = validation_subset(data, config.compressor_eval_records)
    return stage_training_config(
        data / "llava_train.json", data, out, compression, config.compressor_steps, config.compressor_lr,
        config.compressor_lora_r, config, ATTENTION_LORA_TARGETS, config.beta, eval_data=eval_data,
    )


def compressor_base_record(config: RecipeConfig, stage2_steps: int) -> dict[str, Any]:
    """What a compressor run records of how it was trained (:data:`BASE_RECORD_NAME`): the stage-2 steps of its
    base and, with early stopping, its validation settings. A run whose record differs is retrained."""
    record: dict[str, Any] = {"stage2_steps": stage2_steps}
    if config.compressor_patience is not None:
        record["validation"] = {"records": config.compressor_eval_records,
                                "eval_steps": config.compressor_eval_steps, "patience": config.compressor_patience}
    return record


def validation_subset(data: Path, count: int) -> Path:
    """The first ``count`` conversations of the generated validation split, as their own file (written once).

    :data:`VALIDATION_FILE` is in a fixed shuffled order over every set (:func:`write_benchmark_splits`), so its
    first records are a small mixed sample of the validation scenes, the same on every run of the same data.

    Raises
    ------
    ValueError
        If ``count`` < 1 or the split holds fewer than ``count`` conversations.
    FileNotFoundError
        If ``data`` holds no :data:`VALIDATION_FILE`.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an integer >= 1, got {count!r}.")
    source = Path(data) / VALIDATION_FILE
    if not source.is_file():
        raise FileNotFoundError(f"no validation conversations at {source} (written by write_benchmark_splits)")
    target = source.with_name(f"{source.stem}_first{count}.json")
    if not target.is_file():
        records = json.loads(source.read_text())
        if len(records) < count:
            raise ValueError(f"compressor_eval_records={count} but {source} holds {len(records)} conversations.")
        target.write_text(json.dumps(records[:count]))
    return target


def _train_stage(
    model: nn.Module, processor: Any, data: Path, image_folder: Path, out: Path, compression: CompressionConfig,
    steps: int, lr: float, lora_r: int, config: RecipeConfig, lora_targets: list[str] | None, beta: float,
    visual_word_weight: float = 0.0, init_from: Path | None = None, seed: int | None = None,
) -> None:
    train(model, processor, stage_training_config(
        data, image_folder, out, compression, steps, lr, lora_r, config, lora_targets, beta,
        visual_word_weight=visual_word_weight, init_from=init_from, seed=seed,
    ))


def _run_stage1(config: RecipeConfig, data: Path, captions: Path, stage1: Path, keep_all: CompressionConfig) -> None:
    """Projector calibration, pre-alignment and caption training, unless already finished."""
    if stage_finished(stage1, config.stage1_steps):
        return
    model, processor = build_default_model(image_size=config.image_size)
    if config.calibrate_projector:
        stats = calibrate_projector(model, _calibration_pixels(processor, data, config.calibration_images))
        if config.alignment_steps:
            stats.update(align_projector(model, processor, data, images=config.alignment_images,
                                         steps=config.alignment_steps, seed=config.seed))
        stage1.mkdir(parents=True, exist_ok=True)
        (stage1 / "calibration.json").write_text(json.dumps(stats, indent=2))
    _train_stage(model, processor, captions, data, stage1, keep_all, config.stage1_steps, config.stage1_lr,
                 0, config, None, 0.0)


def run_recipe(config: RecipeConfig, only: list[str] | None = None) -> dict[str, str]:
    """Run (or resume) every stage; returns stage name -> output folder.

    Parameters
    ----------
    config
        Sizes and hyper-parameters.
    only
        Stage-3 run names to train (default: all of :func:`compressor_runs`).
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(asdict(config), indent=2, default=str))
    data = out / "data"
    if not benchmark_data_current(data):
        write_benchmark_splits(data, seed=config.seed, sizes=config.data_sizes, image_size=config.image_size)
    conversations = json.loads((data / "llava_train.json").read_text())
    captions = data / "llava_train_captions.json"
    if not captions.is_file():
        captions.write_text(json.dumps([c for c in conversations if str(c["id"]).startswith("caption")]))
    stage2_data = data / "llava_train.json"
    if config.multiturn_turns:
        stage2_data = data / multiturn_file_name(config.multiturn_turns, config.multiturn_choice_orders)
        if not stage2_data.is_file():
            write_multiturn_training(data, seed=config.seed, turns=config.multiturn_turns,
                                     choice_orders=config.multiturn_choice_orders)
    if config.visual_word_weight:
        grid = round(num_visual_tokens(config.image_size) ** 0.5)
        background = config.visual_word_background_weight
        with_words = stage2_data.with_name(f"{stage2_data.stem}_words{grid}_bg{background:g}.json")
        if not with_words.is_file():
            write_visual_words(stage2_data, with_words, data, grid, background)
        stage2_data = with_words
    keep_all = CompressionConfig("deco", keep_ratio=1.0)
    done: dict[str, str] = {}

    stage1 = out / "stage1"
    # A warm-started stage 2 takes its projector from its init, so it needs no stage 1.
    if config.stage2_init is None:
        _run_stage1(config, data, captions, stage1, keep_all)
        done["stage1"] = str(stage1)

    stage2 = out / "stage2"
    if not stage_finished(stage2, config.stage2_steps):
        model, processor = build_default_model(image_size=config.image_size)
        if config.stage2_init is None:
            load_compressor(model, stage1)
            remove_compression(model)
        _train_stage(model, processor, stage2_data, data, stage2, keep_all, config.stage2_steps,
                     config.stage2_lr, config.stage2_lora_r, config, None, 0.0, config.visual_word_weight,
                     init_from=config.stage2_init, seed=warm_start_seed(config))
    done["stage2"] = str(stage2)

    for name, compression in compressor_runs(config).items():
        if only is not None and name not in only:
            continue
        target = out / "compressors" / name
        base = compressor_base_record(config, _stage_steps(stage2))
        if not stage_finished(target, config.compressor_steps, base):
            model, processor = load_base(stage2, image_size=config.image_size)
            train(model, processor, compressor_training_config(config, data, target, compression))
            (target / BASE_RECORD_NAME).write_text(json.dumps(base))
        done[name] = str(target)
    return done


def portable_path(value: str | None, roots: Sequence[Path]) -> str | None:
    """A path of the training machine as it is shipped: relative to the first of ``roots`` (absolute folders) that
    holds it (``/root/runs/r9/data`` -> ``runs/r9/data`` for the root ``/root``); a path under none of them keeps
    only its name. A relative path is taken relative to the working directory."""
    if value is None:
        return None
    path = Path(value)
    absolute = path if path.is_absolute() else Path.cwd() / path
    for root in roots:
        if absolute.is_relative_to(root):
            return absolute.relative_to(root).as_posix()
    return path.name


def _rewrite_json(path: Path, changes: dict[str, Any]) -> None:
    """Set ``changes`` in a JSON file written with ``indent=2``, keeping its key order and final newline."""
    if not path.is_file():
        return
    text = path.read_text()
    data = json.loads(text)
    data.update({key: value for key, value in changes.items() if key in data})
    path.write_text(json.dumps(data, indent=2) + ("\n" if text.endswith("\n") else ""))


def make_portable(stage: Path, roots: Sequence[Path], image_size: int) -> None:
    """Replace the training machine's paths in an exported stage folder's JSON files (in place).

    The base model's cache folder (``config.json``'s ``base_model``, the LoRA adapter's
    ``base_model_name_or_path``) becomes :data:`PORTABLE_BASE_MODEL`; the data, output and init paths of
    ``training_config.json`` become relative (:func:`portable_path`). Nothing reads these at run time
    (``load_compressor`` names ``base_model`` in an error message only); they record where the weights came from.
    """
    base_model = PORTABLE_BASE_MODEL.format(image_size=image_size)
    _rewrite_json(stage / "config.json", {"base_model": base_model})
    _rewrite_json(stage / "lora" / "adapter_config.json", {"base_model_name_or_path": base_model})
    training_path = stage / TRAINING_CONFIG_NAME
    if training_path.is_file():
        recorded = json.loads(training_path.read_text())
        _rewrite_json(training_path, {key: portable_path(recorded.get(key), roots) for key in TRAINING_PATH_KEYS})


def export_assets(output_dir: str | Path, assets_dir: str | Path = ASSETS_DIR) -> Path:
    """Copy what the package ships of a finished recipe into ``assets_dir``: ``recipe.json``, ``stage2`` and
    ``compressors/*``, without :data:`RUN_ONLY_FILES`, and with the run's machine paths made portable
    (:func:`make_portable`: relative to the working directory, else to the folder that holds the run).

    Stage 1 is not shipped: only stage 2 of the same run starts from it (a warm start from the shipped stage 2,
    ``--stage2-init``, skips stage 1), and its calibration figures are in docs/results.md.
    """
    source = Path(output_dir)
    target = Path(assets_dir)
    roots = (Path.cwd(), (source if source.is_absolute() else Path.cwd() / source).parent)
    recipe = json.loads((source / "recipe.json").read_text()) if (source / "recipe.json").is_file() else {}
    image_size = int(recipe.get("image_size", 168))
    for stage in [source / "stage2", *sorted((source / "compressors").glob("*"))]:
        if not stage_finished(stage):
            continue
        destination = target / stage.relative_to(source)
        if destination.exists():
            shutil.rmtree(destination)
        destination.mkdir(parents=True)
        for item in stage.iterdir():
            if item.name in RUN_ONLY_FILES:
                continue
            if item.is_dir():
                shutil.copytree(item, destination / item.name)
            else:
                shutil.copy2(item, destination / item.name)
        make_portable(destination, roots, image_size)
    if recipe:
        shutil.copy2(source / "recipe.json", target / "recipe.json")
        _rewrite_json(target / "recipe.json", {key: portable_path(recipe.get(key), roots) for key in RECIPE_PATH_KEYS})
    return target
