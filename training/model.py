"""The classifier: a frozen conv base plus a small head, on raw uint8 pixels.

uint8 RGB [batch, H, W, 3] → VGGPreprocess → VGG16 conv layers (block1_conv1 …
block5_pool, flattened into this model so `get_layer("block5_conv3")` works for
Grad-CAM) → GlobalAveragePooling2D ("features") → Dense(256, relu) →
Dropout(0.5) → Dense(3) logits → TemperatureScaling → Softmax.

The graph is a plain chain, which is what lets `split_model` cut it anywhere
into a prefix (run once, outputs cached) and a suffix (trained on the cache)
that share the same layer objects.
"""

import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
from typing import Iterator, List, Optional, Tuple

import keras
import numpy as np

import schemas
from busi_core import inference
from busi_core.layers import AreaResize, TemperatureScaling, VGGPreprocess
# Layer names other code relies on are artifact fields, spelled in schemas.
from schemas.artifact import (FEATURES_LAYER, INPUT_NAME, LOGITS_LAYER,
                              PREPROCESS_LAYER, PROBABILITIES_LAYER,
                              RESIZE_LAYER, TEMPERATURE_LAYER)
from busi_core import precision as precision_lib
from training.config import (AUTO, BACKBONES, BFLOAT16, FLOAT32, IMAGENET,
                             NO_WEIGHTS, TINY, VGG16)

HEAD_UNITS = 256
DROPOUT_RATE = 0.5

TOP_BLOCK_PREFIX = "block5_"  # unfrozen by the fine-tune stage


class BackboneWeightsError(ValueError):
  """The backbone weights cannot be had; the message says what to pass."""


def weights_source(backbone_weights: str) -> str:
  """How the weights are recorded in metadata.json.

  "imagenet", "none", or for a file its basename and content hash
  ("vgg16_notop.h5@sha256:…"), so that two artifacts trained from different
  files with the same name are told apart.
  """
  if backbone_weights in (IMAGENET, NO_WEIGHTS):
    return backbone_weights
  digest = hashlib.sha256()
  with _local_copy(backbone_weights) as path, open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return f"{os.path.basename(backbone_weights)}@sha256:{digest.hexdigest()}"


@contextlib.contextmanager
def _local_copy(path: str) -> Iterator[str]:
  """A local path for a local or remote (gs://) weights file."""
  if "://" not in path:
    if not os.path.isfile(path):
      raise BackboneWeightsError(
          f"--backbone_weights {path!r}: no such file. Pass a local Keras"
          " VGG16 notop .h5, 'imagenet' or 'none'.")
    yield path
    return
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  if not FileSystems.exists(path):
    raise BackboneWeightsError(
        f"--backbone_weights {path!r}: no such file.")
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, os.path.basename(path))
    with FileSystems.open(path) as src, open(local, "wb") as dst:
      shutil.copyfileobj(src, dst, 1 << 20)
    yield local


def _vgg16_base(image_size: int, backbone_weights: str) -> keras.Model:
  shape = (image_size, image_size, 3)
  if backbone_weights == NO_WEIGHTS:
    return keras.applications.VGG16(include_top=False, weights=None,
                                    input_shape=shape)
  if backbone_weights == IMAGENET:
    try:
      return keras.applications.VGG16(include_top=False, weights=IMAGENET,
                                      input_shape=shape)
    except Exception as e:  # get_file raises a bare Exception offline
      raise BackboneWeightsError(
          "could not get Keras' ImageNet VGG16 weights"
          f" ({type(e).__name__}: {e}). Without network access pass"
          " --backbone_weights PATH (a local Keras VGG16 notop .h5, e.g."
          " vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5) or"
          " --backbone_weights none (random weights, for tests).") from e
  with _local_copy(backbone_weights) as path:
    try:
      return keras.applications.VGG16(include_top=False, weights=path,
                                      input_shape=shape)
    except Exception as e:  # h5py and Keras raise many types for bad files
      raise BackboneWeightsError(
          f"--backbone_weights {backbone_weights!r} is not a Keras VGG16 notop"
          f" weights file ({type(e).__name__}: {e}).") from e


def _tiny_base(image_size: int) -> keras.Model:
  """Test stand-in: two small convs, named like VGG16's block1 and block5.

  The last conv is "block5_conv3" so Grad-CAM and the fine-tune switch find
  the layers they look for. It builds and runs in milliseconds.
  """
  inputs = keras.Input((image_size, image_size, 3))
  x = keras.layers.Conv2D(8, 3, padding="same", activation="relu",
                          name="block1_conv1")(inputs)
  x = keras.layers.MaxPooling2D(2, name="block1_pool")(x)
  x = keras.layers.Conv2D(16, 3, padding="same", activation="relu",
                          name=schemas.GRADCAM_LAYER)(x)
  x = keras.layers.MaxPooling2D(2, name="block5_pool")(x)
  return keras.Model(inputs, x, name="tiny_test_backbone")


@functools.lru_cache(maxsize=None)
def _gpu_bfloat16() -> Optional[str]:
  """Name of a visible GPU with bfloat16 tensor cores (compute capability
  8.0 or more), or None. Asked of TensorFlow once a process: its physical
  devices are fixed once it has started, and `resolve_precision` and
  `bfloat16_device` both need the answer."""
  if keras.backend.backend() != "tensorflow":
    return None
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  for gpu in tf.config.list_physical_devices("GPU"):
    details = tf.config.experimental.get_device_details(gpu)
    if tuple(details.get("compute_capability") or (0, 0)) >= (8, 0):
      return details.get("device_name") or gpu.name
  return None


AMX_BFLOAT16 = precision_lib.AMX_BFLOAT16


def bfloat16_device() -> Optional[str]:
  """What computes bfloat16 here, the fastest kind first: a bfloat16 GPU
  ("GPU <its name>"), AMX_BFLOAT16, "avx512_bf16" (a CPU with AVX512-BF16
  and no AMX), or None. On 2 cores VGG16's frozen pass ran about 6x faster
  in bfloat16 than in float32 with AMX and 2x with AVX512-BF16 alone, which
  decides what fine-tune fits train's budget (`training.recipe.resolved`)."""
  gpu = _gpu_bfloat16()
  if gpu:
    return f"GPU {gpu}"
  flags = precision_lib.cpu_bfloat16_flags()  # the fastest first
  return flags[0] if flags else None


def resolve_precision(requested: str) -> Tuple[str, str]:
  """--training_precision made concrete: (float32 or bfloat16, why).

  "auto" is bfloat16 where the hardware computes in it: a GPU with bfloat16
  tensor cores, or a CPU with AMX-BF16 or AVX512-BF16 (with AMX, VGG16's
  frozen pass ran 6x and its block5 fine-tune step ~3x faster than float32
  on 2 cores; training/README.md, "bfloat16 arithmetic"); elsewhere float32,
  because emulated bfloat16 is slower than float32.
  """
  if requested != AUTO:
    return requested, "asked for"
  gpu = _gpu_bfloat16()
  if gpu:
    return BFLOAT16, f"auto: GPU {gpu} has bfloat16 tensor cores"
  flags = precision_lib.cpu_bfloat16_flags()
  if flags:
    return BFLOAT16, f"auto: the CPU has {', '.join(flags)}"
  return FLOAT32, "auto: no bfloat16 instructions on this CPU or GPU"


def reduced_precision_copy(model: keras.Model, precision: str
                          ) -> keras.Model:
  """`model` (or a `sub_model`) computing in `precision` (float32: itself).

  The copy has its own float32 weights, equal to the model's, and its random
  layers continue from the model's generator states (dropout draws still
  depend on the seed alone); train it, then `model.set_weights(copy
  .get_weights())` to bring the result back.
  """
  if precision == FLOAT32:
    return model
  copy = precision_lib.with_precision(model, precision)
  for source, target in zip(_seed_generators(model), _seed_generators(copy)):
    target.state.assign(source.state.value)
  return copy


def _seed_generators(model: keras.Model) -> List[keras.random.SeedGenerator]:
  """The random layers' generators, in layer order (nested models too)."""
  found, layers = [], list(model.layers)
  while layers:
    layer = layers.pop(0)
    layers.extend(getattr(layer, "layers", []))
    found.extend(value for value in vars(layer).values()
                 if isinstance(value, keras.random.SeedGenerator))
  return found


def build_model(image_size: int, backbone_weights: str = NO_WEIGHTS,
                num_classes: int = 3, backbone: str = VGG16,
                network_size: Optional[int] = None) -> keras.Model:
  """The full classifier on raw uint8 RGB, base frozen (stage one).

  Args:
    image_size: input height and width (the TFRecords' size).
    backbone_weights: "imagenet" (Keras download), "none" (random init), or
      the path of a Keras VGG16 notop .h5 (local or gs://).
    num_classes: outputs of the softmax.
    backbone: "vgg16", or "tiny" (a test stand-in; weights must be "none").
    network_size: the backbone's input height and width: the preprocessed
      image is resized to it inside the model (area interpolation; layer
      RESIZE_LAYER). None or image_size: no resize.

  Returns:
    An uncompiled model [batch, image_size, image_size, 3] uint8 → [batch,
    num_classes] probabilities, with only the head trainable.

  Raises:
    BackboneWeightsError: the weights cannot be downloaded or read.
    ValueError: unknown backbone, or weights requested for "tiny".
  """
  size = network_size or image_size
  if backbone == VGG16:
    base = _vgg16_base(size, backbone_weights)
  elif backbone == TINY:
    if backbone_weights != NO_WEIGHTS:
      raise ValueError("the tiny test backbone has no pretrained weights;"
                       " pass backbone_weights='none'")
    base = _tiny_base(size)
  else:
    raise ValueError(f"unknown backbone {backbone!r}; use one of {BACKBONES}")

  inputs = keras.Input((image_size, image_size, 3), dtype="uint8",
                       name=INPUT_NAME)
  x = VGGPreprocess(name=PREPROCESS_LAYER)(inputs)
  if size != image_size:
    # After the preprocessing, which computes in float32. Area
    # interpolation, as preprocessing's INTER_AREA: enlarging, it repeats
    # pixels and keeps the speckle sharp (bilinear smoothed it and lost
    # most of the gain); shrinking, it averages. VGG16's filters then see
    # the lesions at a larger scale (training/README.md, "Network input
    # size").
    x = AreaResize(size, name=RESIZE_LAYER)(x)
  # The base's layers are copied into this model's chain rather than nesting
  # the base as one layer: Grad-CAM and the fine-tune switch then reach
  # block5_conv3 by name, and sub_model can cut between any two layers. Fresh
  # copies (not the base's own objects) so that each layer's first call, which
  # `layer.output` refers to, is the one in this model.
  for layer in base.layers[1:]:
    copy = layer.__class__.from_config(layer.get_config())
    x = copy(x)
    copy.set_weights(layer.get_weights())
  x = keras.layers.GlobalAveragePooling2D(name=FEATURES_LAYER)(x)
  x = keras.layers.Dense(HEAD_UNITS, activation="relu", name="head_dense")(x)
  x = keras.layers.Dropout(DROPOUT_RATE, name="head_dropout")(x)
  # Logits, not softmax: calibration divides them by a temperature first.
  x = keras.layers.Dense(num_classes, name=LOGITS_LAYER)(x)
  x = TemperatureScaling(1.0, name=TEMPERATURE_LAYER)(x)
  outputs = keras.layers.Softmax(name=PROBABILITIES_LAYER)(x)
  model = keras.Model(inputs, outputs, name=f"busi_{backbone}")
  freeze_backbone(model)
  return model


def network_size(model: keras.Model) -> int:
  """The backbone's input size: the resize layer's, else the model input's."""
  try:
    return int(model.get_layer(RESIZE_LAYER).output.shape[1])
  except ValueError:  # no such layer
    return int(model.inputs[0].shape[1])


def backbone_layers(model: keras.Model) -> List[keras.layers.Layer]:
  """The conv base's layers: after the preprocessing (and resize), before
  the features."""
  names = [layer.name for layer in model.layers]
  start = names.index(PREPROCESS_LAYER) + 1
  if RESIZE_LAYER in names:
    start = names.index(RESIZE_LAYER) + 1
  stop = names.index(FEATURES_LAYER)
  return model.layers[start:stop]


def freeze_backbone(model: keras.Model) -> None:
  """Stage one: only the head trains. Recompile after calling."""
  for layer in backbone_layers(model):
    layer.trainable = False


def _fine_tune_start(model: keras.Model, first: Optional[str]) -> int:
  """Position in `backbone_layers` of the first layer the fine-tune stage
  trains: `first`, or block5's first layer when None."""
  layers = backbone_layers(model)
  if first is None:
    for position, layer in enumerate(layers):
      if layer.name.startswith(TOP_BLOCK_PREFIX):
        return position
    raise ValueError(f"model {model.name} has no {TOP_BLOCK_PREFIX}* layers")
  convs = [layer.name for layer in layers if layer.weights]
  for position, layer in enumerate(layers):
    if layer.name == first and layer.weights:
      return position
  raise ValueError(f"--fine_tune_from {first!r} is not a layer with weights"
                   f" of the {model.name} base; one of: {', '.join(convs)}")


def unfreeze_fine_tuned(model: keras.Model, first: Optional[str] = None
                       ) -> List[str]:
  """Stage two: block5's layers train too, or layer `first` and every base
  layer after it. Recompile after calling.

  Returns:
    The names of the layers with weights made trainable.

  Raises:
    ValueError: the model has no block5 layers, or no layer `first` with
      weights in its base.
  """
  layers = backbone_layers(model)
  names = []
  for layer in layers[_fine_tune_start(model, first):]:
    layer.trainable = True
    if layer.weights:
      names.append(layer.name)
  return names


def reseed(model: keras.Model, seed: int) -> None:
  """Puts the random layers' generators (the head's Dropout) in a state that
  depends on `seed` alone.

  `keras.utils.set_random_seed` does not reach them: a Dropout layer draws
  its masks from its own generator, created with the layer, whose state moves
  on with every training step and is not among the weights that
  `set_weights` puts back. Without this, a fit's dropout masks would depend
  on every fit that ran before it on the same model (a cv fold on the folds
  before it, `train`'s final model on its cross-validation).
  """
  for index, generator in enumerate(_seed_generators(model)):
    start = np.random.SeedSequence([seed, index]).generate_state(1)[0]
    generator.state.assign(np.array([start, 0]).astype(generator.state.dtype))


def compile_model(model: keras.Model, learning_rate,
                  label_smoothing: float = 0.0,
                  ema_momentum: float = 0.0) -> None:
  """Adam + categorical cross-entropy on the softmax output + accuracy.

  `learning_rate`: a number, or a keras.optimizers.schedules schedule.

  `ema_momentum` above 0 makes Adam keep an exponential moving average of
  the weights (`use_ema`), which `fit` writes into them at its end; pair it
  with `keras.callbacks.SwapEMAWeights` to validate on the average.

  `label_smoothing` moves that share of each target onto the other classes
  evenly: the head is not pushed towards ever larger logits on the few
  hundred training images it can separate.
  """
  model.compile(
      optimizer=keras.optimizers.Adam(learning_rate,
                                      use_ema=ema_momentum > 0,
                                      ema_momentum=ema_momentum),
      loss=keras.losses.CategoricalCrossentropy(
          label_smoothing=label_smoothing),
      metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])


def frozen_prefix_end(model: keras.Model) -> str:
  """Name of the last layer before the first one with trainable weights.

  Everything up to it is fixed while training, so its outputs can be computed
  once and cached: "features" in stage one, "block4_pool" once block5 trains
  (the layer before --fine_tune_from's).
  """
  previous = None
  for layer in model.layers:
    if layer.trainable_weights:
      if previous is None:
        raise ValueError("the model's first layer is trainable: no prefix")
      return previous
    previous = layer.name
  raise ValueError(f"model {model.name} has no trainable weights")


def sub_model(model: keras.Model, after: Optional[str] = None,
              upto: Optional[str] = None) -> keras.Model:
  """The part of the chain after layer `after` up to layer `upto` (inclusive).

  It shares the full model's layer objects: training it trains the full
  model.

  Args:
    model: a model from `build_model`.
    after: the layer whose output is the sub-model's input; None for the
      model's own input.
    upto: the sub-model's last layer; None for the model's output layer.
  """
  names = [layer.name for layer in model.layers]
  stop = names.index(upto) if upto else len(names) - 1
  if after is None:
    # A single input as a tensor, not a one-element list: calling the
    # sub-model on a plain array then matches its input structure.
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, model.layers[stop].output,
                       name=f"{model.name}_to_{names[stop]}")
  start = names.index(after)
  if start >= stop:
    raise ValueError(f"layer {after!r} does not come before {names[stop]!r}")
  source = model.get_layer(after).output
  inputs = keras.Input(source.shape[1:], dtype=source.dtype,
                       name=f"{after}_output")
  x = inputs
  for layer in model.layers[start + 1:stop + 1]:
    x = layer(x)
  return keras.Model(inputs, x, name=f"{model.name}_{after}_to_{names[stop]}")


def split_model(model: keras.Model, cut: str
               ) -> Tuple[keras.Model, keras.Model]:
  """Cuts the chain after layer `cut` into (prefix, suffix).

  Both halves share the full model's layer objects: training the suffix
  trains the full model, and `full(x) == suffix(prefix(x))`.

  Returns:
    prefix: model input → output of `cut`; suffix: that → model output.
  """
  return sub_model(model, None, cut), sub_model(model, cut, None)


def fine_tune_input(model: keras.Model, first: Optional[str] = None) -> str:
  """Name of the layer just before the first one the fine-tune stage trains
  (block4_pool for block5; the preprocessing for block1_conv1): its output
  is what a fine-tuning run caches.

  Raises:
    ValueError: as `unfreeze_fine_tuned`.
  """
  start = backbone_layers(model)[_fine_tune_start(model, first)]
  names = [layer.name for layer in model.layers]
  return names[names.index(start.name) - 1]


def temperature_of(model: keras.Model) -> float:
  """The model's TemperatureScaling value (1.0 if it has none)."""
  for layer in model.layers:
    if isinstance(layer, TemperatureScaling):
      return layer.value
  return 1.0


def set_temperature(model: keras.Model, temperature: float) -> None:
  """Sets the model's TemperatureScaling layer (weight and config).

  Raises:
    ValueError: the model has no TemperatureScaling layer, or the value is
      not a positive finite number.
  """
  for layer in model.layers:
    if isinstance(layer, TemperatureScaling):
      layer.set_temperature(temperature)
      return
  raise ValueError(f"model {model.name} has no TemperatureScaling layer")


def predict_logits(model: keras.Model, images: np.ndarray,
                   batch_size: int = 32) -> np.ndarray:
  """The "logits" layer's output on raw uint8 pixels, before the temperature.

  What calibration fits a temperature on. Plain calls in batches rather than
  predict(): each new sub-model's predict() traces a function, and
  TensorFlow then warns about retracing.

  Args:
    model: a model from `build_model` (or loaded from an artifact).
    images: uint8 [n, H, W, 3].
    batch_size: images per call.

  Returns:
    float32 numpy array [n, classes] ([0, classes] for no images).
  """
  if not len(images):
    return np.zeros((0, int(model.outputs[0].shape[-1])), np.float32)
  return in_batches(sub_model(model, None, LOGITS_LAYER), images, batch_size)


def in_batches(model: keras.Model, inputs: np.ndarray, batch_size: int,
               traced: bool = False, dtype=np.float32) -> np.ndarray:
  """`model(inputs)` in inference mode, `batch_size` rows a call.

  Never predict(): each new sub-model's predict() traces a function (and
  TensorFlow then warns about retracing), and on 2 cores predict() stalls
  between batches and runs VGG16 at about half the speed
  (`python -m bench.conv_cache_bench`).

  Args:
    model: any Keras model with one input.
    inputs: its input rows.
    batch_size: rows a call.
    traced: call the model's traced `tf.function`, the one scoring uses
      (`busi_core.inference.compiled_call`): traced once per model object,
      then the fastest call; for a model that sees many batches (the conv
      cache). False: plain eager calls, for models built for a few batches.

    dtype: the returned array's (numpy's, or ml_dtypes.bfloat16 for a
      bfloat16 model's outputs without a rounding step).

  Returns:
    numpy array [n, ...] of `dtype` ([0, ...] for no inputs).
  """
  call = (inference.compiled_call(model) if traced else
          lambda x: model(x, training=False))
  return np.concatenate(
      [np.zeros((0,) + tuple(model.outputs[0].shape[1:]), dtype)] +
      [np.asarray(call(inputs[i:i + batch_size])).astype(dtype, copy=False)
       for i in range(0, len(inputs), batch_size)])
