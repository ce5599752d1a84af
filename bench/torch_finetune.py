"""How far fine-tuning more of VGG16 goes, measured on a GPU with PyTorch.

`train` and `cv` are TensorFlow/Keras; the GPU machines these measurements
ran on carry PyTorch, not TensorFlow. So this is a PyTorch re-implementation
of `training.recipe`'s two stages, run on `cv`'s own folds and inner
train/validation splits and scored by `cv`'s own code (temperature, review
threshold for 0.95, `training.cv.fold_metrics`). It answers "what would
fine-tuning block4, or the whole base, buy on these data?"; the Keras
recipe does the same with `--fine_tune_epochs N --fine_tune_from LAYER`.
Figures: training/README.md, "Fine-tuning more of the base".

Three steps, two machines:

  # here (the project's environment): images, labels, cv's folds, weights
  python -m bench.torch_finetune export --data GLOB --backbone_weights H5 \
      --output DIR [--folds 5] [--seed 0]
  # on a machine with PyTorch (a GPU: 2-5 min for the variants on an H200);
  # needs numpy and torch only, not this project's environment
  python3 bench/torch_finetune.py run DIR --output RESULTS_DIR \
      [--variants NAME ...]
  # here: cv's figures of each variant, with and without flip averaging
  python -m bench.torch_finetune score DIR RESULTS_DIR/results.npz

Per fold, the head (GAP → Dense 256 → Dropout 0.5 → Dense 3) trains on the
frozen base's features of 8 fixed views (original, mirror, 6 random affine
views: rotation ±15°, shift ±10 %, zoom ±10 % per axis, flip, reflected
borders), Adam 1e-3, batch 32, label smoothing 0.1, balanced class weights
with malignant ×2, early stop on validation loss (patience 20, best kept):
the default recipe. Each variant then starts from that head and trains its
base layers and the head with Adam at its learning rate, an epoch being 8
passes over the training images with fresh random views ("fixed": the 8
fixed views instead), early stop on validation loss, best kept.

Where it differs from the Keras recipe, the head-only row differs too
(0.04-0.06 lower macro-F1 on the dev set), so compare its rows with each
other, not with `cv`'s:
- weight initialisation, the random views (drawn per fold here, once for
  every fold in `cv`; geometry only here, where `cv` now also degrades
  every second random view, `--degrade`, and marks about half of each
  random view, `--annotate`) and the dropout draws;
- early stopping here watches the class-weighted validation loss; Keras
  weights only the training loss (`class_weight`), so its `val_loss` and
  hence its best epochs differ. Kept as it was when the README's figures
  were measured.
The recipe's constants below mirror training/config.py's defaults (a test
checks them).
"""

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

DATA_FILE = "busi.npz"
WEIGHTS_FILE = "vgg16_fp16.npz"
RESULTS_FILE = "results.npz"
LOG_FILE = "log.json"
VIEWS = 8
BATCH = 32
MALIGNANT_WEIGHT = 2.0
LABEL_SMOOTHING = 0.1
HEAD_EPOCHS, HEAD_PATIENCE = 300, 20
BLOCKS = [(1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512)]
CONVS = [f"block{b}_conv{c}" for b, n, _ in BLOCKS for c in range(1, n + 1)]
MEAN_BGR = (103.939, 116.779, 123.68)  # Keras' VGG16 "caffe" preprocessing

# name → (first trained conv, None: head only; learning rate; most epochs;
# patience; fixed views instead of fresh ones each epoch)
VARIANTS = {
    "head": (None, 0.0, 0, 0, False),
    "b5c3_1e-5": ("block5_conv3", 1e-5, 12, 4, False),
    "b5_1e-5": ("block5_conv1", 1e-5, 12, 4, False),
    "b5_3e-5": ("block5_conv1", 3e-5, 12, 4, False),
    "b4b5_1e-5": ("block4_conv1", 1e-5, 12, 4, False),
    "all_1e-5": ("block1_conv1", 1e-5, 12, 4, False),
    "all_1e-5_p8": ("block1_conv1", 1e-5, 24, 8, False),
    "allfixed_1e-5": ("block1_conv1", 1e-5, 12, 4, True),
    "all_3e-5": ("block1_conv1", 3e-5, 12, 4, False),
}


def export(data: Sequence[str], backbone_weights: str, output: str,
           folds: int = 5, seed: int = 0) -> Dict:
  """Writes DATA_FILE (uint8 images, labels, each fold's roles: 0 train,
  1 validation, 2 test, as `cv` deals them) and WEIGHTS_FILE (the conv
  weights, float16) into `output`."""
  import h5py  # pylint: disable=import-outside-toplevel
  import schemas  # pylint: disable=import-outside-toplevel
  from training import cv, data as data_lib, split  # pylint: disable=import-outside-toplevel
  from training.config import TrainConfig  # pylint: disable=import-outside-toplevel
  names = list(schemas.LABELS)
  if names.index(schemas.MALIGNANT) != 2:
    raise ValueError(f"expected malignant as the third label: {names}")
  config = TrainConfig(data=tuple(data), output="", seed=seed)
  loaded, _ = data_lib.load_labelled(config.data, names, None)
  hashes = [split.dhash(image) for image in loaded.images]
  group_of = split.duplicate_groups(loaded.image_ids, hashes)
  fold_of = cv.assign_folds(loaded.image_ids,
                            [names[i] for i in loaded.labels], group_of,
                            folds, seed)
  role = np.zeros((folds, len(loaded.labels)), np.int8)
  for k in range(folds):
    _, val, test = cv.fold_split(k, config, loaded, hashes, fold_of)
    role[k, val] = 1
    role[k, test] = 2
  os.makedirs(output, exist_ok=True)
  np.savez_compressed(os.path.join(output, DATA_FILE), images=loaded.images,
                      labels=loaded.labels, role=role,
                      label_names=np.array(names))
  weights = {}
  with h5py.File(backbone_weights, "r") as f:
    for name in CONVS:
      group = f[name][name] if name in f[name] else f[name]
      for key in group:  # Keras' notop layout: NAME/NAME/{kernel,bias}
        kind = "W" if "kernel" in key or "_W" in key else "b"
        weights[f"{name}/{kind}"] = group[key][()].astype(np.float16)
  if len(weights) != 2 * len(CONVS):
    raise ValueError(f"{backbone_weights}: found {sorted(weights)}, not the"
                     " 13 convs' kernels and biases of a VGG16 notop file")
  np.savez(os.path.join(output, WEIGHTS_FILE), **weights)
  return {"images": int(len(loaded.labels)), "folds": folds,
          "roles": [np.bincount(r, minlength=3).tolist() for r in role]}


def run(directory: str, output: str, variants: Sequence[str]) -> None:
  """Trains every variant on every fold; writes RESULTS_FILE (validation and
  test logits, of the images and their mirror images, and the indices) and
  LOG_FILE (epochs, seconds) after each fold and variant."""
  # PyTorch only here: this runs where TensorFlow is not installed.
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

  device = "cuda" if torch.cuda.is_available() else "cpu"
  amp = device == "cuda"
  torch.backends.cudnn.benchmark = True
  data = np.load(os.path.join(directory, DATA_FILE))
  images, labels, roles = data["images"], data["labels"], data["role"]
  stored = np.load(os.path.join(directory, WEIGHTS_FILE))
  mean = torch.tensor(MEAN_BGR, device=device).view(1, 3, 1, 1)

  class Net(nn.Module):
    """VGG16's conv base from the exported weights, and the seed's head."""

    def __init__(self):
      super().__init__()
      self.convs = nn.ModuleDict()
      previous = 3
      for name in CONVS:
        width = dict((b, w) for b, _, w in BLOCKS)[int(name[5])]
        conv = nn.Conv2d(previous, width, 3, padding=1)
        with torch.no_grad():  # Keras HWIO → PyTorch OIHW
          conv.weight.copy_(torch.from_numpy(
              stored[f"{name}/W"].astype(np.float32)).permute(3, 2, 0, 1))
          conv.bias.copy_(torch.from_numpy(
              stored[f"{name}/b"].astype(np.float32)))
        self.convs[name] = conv
        previous = width
      self.fc1, self.fc2 = nn.Linear(512, 256), nn.Linear(256, 3)
      for fc in (self.fc1, self.fc2):  # Keras' Dense defaults
        nn.init.xavier_uniform_(fc.weight)
        nn.init.zeros_(fc.bias)
      self.drop = nn.Dropout(0.5)

    def features(self, x):
      """uint8-range float NHWC RGB → GAP of block5_pool."""
      x = x.permute(0, 3, 1, 2)[:, [2, 1, 0]] - mean
      x = x.contiguous(memory_format=torch.channels_last)
      for b, n, _ in BLOCKS:
        for c in range(1, n + 1):
          x = F.relu(self.convs[f"block{b}_conv{c}"](x))
        x = F.max_pool2d(x, 2)
      return x.float().mean(dim=(2, 3))

    def head(self, f):
      return self.fc2(self.drop(F.relu(self.fc1(f))))

    def forward(self, x):
      return self.head(self.features(x))

  def augment(x, generator):
    """training.augment's geometry (its 0.01° shear left out), one bilinear
    resample with reflected borders."""
    b = x.shape[0]
    uniform = lambda low, high: (torch.rand(b, generator=generator) *
                                 (high - low) + low)
    theta = uniform(-1, 1) * math.radians(15)
    zoom_x, zoom_y = uniform(0.9, 1.1), uniform(0.9, 1.1)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    shift_x, shift_y = uniform(-0.2, 0.2), uniform(-0.2, 0.2)  # 10 %, in [-1, 1]
    cos, sin = torch.cos(theta), torch.sin(theta)
    matrix = torch.stack([
        torch.stack([cos * zoom_x * flip, -sin * zoom_y, shift_x], 1),
        torch.stack([sin * zoom_x * flip, cos * zoom_y, shift_y], 1)],
                         1).to(x.device)
    grid = F.affine_grid(matrix, (b, x.shape[3], x.shape[1], x.shape[2]),
                         align_corners=False)
    return F.grid_sample(x.permute(0, 3, 1, 2), grid, mode="bilinear",
                         padding_mode="reflection",
                         align_corners=False).permute(0, 2, 3, 1)

  def loss_fn(logits, y, class_weight):
    """Keras' categorical cross-entropy with label smoothing, class weights
    as sample weights, mean over the batch."""
    target = (F.one_hot(y, 3).float() * (1 - LABEL_SMOOTHING) +
              LABEL_SMOOTHING / 3)
    per = -(target * F.log_softmax(logits.float(), 1)).sum(1)
    return (per * class_weight[y]).mean()

  def on_device(indices):
    return torch.from_numpy(images[indices]).to(device).float()

  @torch.no_grad()
  def evaluate(net, x, y, class_weight, head_only=False):
    net.eval()
    parts = []
    for s in range(0, len(x), 128):
      with torch.autocast("cuda", torch.bfloat16, enabled=amp):
        parts.append((net.head if head_only else net)(x[s:s + 128]).float())
    logits = torch.cat(parts)
    return logits, float(loss_fn(logits, y, class_weight))

  @torch.no_grad()
  def fixed_views(x, seed):
    """[VIEWS × n] images: original, mirror, VIEWS - 2 random views."""
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([x, x.flip(2)] + [
        torch.cat([augment(x[s:s + 128], generator)
                   for s in range(0, len(x), 128)])
        for _ in range(VIEWS - 2)])

  @torch.no_grad()
  def features_of(net, x):
    net.eval()
    parts = []
    for s in range(0, len(x), 128):
      with torch.autocast("cuda", torch.bfloat16, enabled=amp):
        parts.append(net.features(x[s:s + 128]).float())
    return torch.cat(parts)

  def fit(net, params, lr, epochs, patience, batches, val_x, val_y,
          class_weight, head_only):
    optimizer = torch.optim.Adam(params, lr=lr, eps=1e-7)  # Keras' epsilon
    best, best_state, best_epoch, waited, run_epochs = math.inf, None, 0, 0, 0
    for epoch in range(epochs):
      net.train()
      for xb, yb in batches():
        with torch.autocast("cuda", torch.bfloat16, enabled=amp):
          logits = net.head(xb) if head_only else net(xb)
        loss = loss_fn(logits, yb, class_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
      run_epochs = epoch + 1
      _, val_loss = evaluate(net, val_x, val_y, class_weight, head_only)
      if val_loss < best:
        best, best_epoch, waited = val_loss, run_epochs, 0
        best_state = {k: v.detach().clone()
                      for k, v in net.state_dict().items()}
      else:
        waited += 1
        if waited >= patience:
          break
    net.load_state_dict(best_state)
    return {"epochs_run": run_epochs, "best_epoch": best_epoch,
            "val_loss": round(best, 5)}

  os.makedirs(output, exist_ok=True)
  results: Dict[str, np.ndarray] = {}
  log: Dict = {"device": device, "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name() if amp else None}
  started = time.time()
  for k in range(len(roles)):
    train, val, test = (np.flatnonzero(roles[k] == r) for r in (0, 1, 2))
    counts = np.bincount(labels[train], minlength=3)
    weights = len(train) / (3 * counts)
    weights[2] *= MALIGNANT_WEIGHT
    class_weight = torch.tensor(weights, dtype=torch.float32, device=device)
    y_train = torch.from_numpy(labels[train]).to(device)
    y_val = torch.from_numpy(labels[val]).to(device)
    y_test = torch.from_numpy(labels[test]).to(device)
    torch.manual_seed(k)
    net = Net().to(device).to(memory_format=torch.channels_last)
    x_train, x_val, x_test = on_device(train), on_device(val), on_device(test)
    t0 = time.time()
    for p in net.convs.parameters():
      p.requires_grad_(False)
    views = fixed_views(x_train, seed=k)
    view_x = features_of(net, views)
    view_y = y_train.repeat(VIEWS)
    val_features = features_of(net, x_val)

    def head_batches():
      order = torch.randperm(len(view_x), device=device)
      for s in range(0, len(order), BATCH):
        yield view_x[order[s:s + BATCH]], view_y[order[s:s + BATCH]]

    head_log = fit(net, list(net.fc1.parameters()) +
                   list(net.fc2.parameters()), 1e-3, HEAD_EPOCHS,
                   HEAD_PATIENCE, head_batches, val_features, y_val,
                   class_weight, head_only=True)
    head_log["seconds"] = round(time.time() - t0, 1)
    head_state = {n: v.detach().clone() for n, v in net.state_dict().items()}
    for name in variants:
      first, lr, epochs, patience, fixed = VARIANTS[name]
      net.load_state_dict(head_state)
      entry = {"head": head_log}
      if first is not None:
        t0 = time.time()
        params = list(net.fc1.parameters()) + list(net.fc2.parameters())
        for position, conv in enumerate(CONVS):
          trains = position >= CONVS.index(first)
          for p in net.convs[conv].parameters():
            p.requires_grad_(trains)
            if trains:
              params.append(p)
        generator = torch.Generator().manual_seed(1000 + k)

        def batches():
          if fixed:
            order = torch.randperm(len(views), generator=generator)
            for s in range(0, len(order), BATCH):
              idx = order[s:s + BATCH].to(device)
              yield views[idx], view_y[idx]
            return
          for _ in range(VIEWS):
            order = torch.randperm(len(train), generator=generator)
            for s in range(0, len(order), BATCH):
              idx = order[s:s + BATCH].to(device)
              yield augment(x_train[idx], generator), y_train[idx]

        entry["fine_tune"] = fit(net, params, lr, epochs, patience, batches,
                                 x_val, y_val, class_weight, head_only=False)
        entry["fine_tune"]["seconds"] = round(time.time() - t0, 1)
      for split_name, x, y, indices in (("val", x_val, y_val, val),
                                        ("test", x_test, y_test, test)):
        logits, _ = evaluate(net, x, y, class_weight)
        mirrored, _ = evaluate(net, x.flip(2), y, class_weight)
        results[f"{name}/{k}/{split_name}_logits"] = logits.cpu().numpy()
        results[f"{name}/{k}/{split_name}_mirror_logits"] = (
            mirrored.cpu().numpy())
        results[f"{name}/{k}/{split_name}"] = indices
      log.setdefault(name, {})[k] = entry
      print(f"fold {k} {name}: {json.dumps(entry)}"
            f" t={time.time() - started:.0f}s", flush=True)
      np.savez(os.path.join(output, RESULTS_FILE), **results)
      with open(os.path.join(output, LOG_FILE), "w") as f:
        json.dump(log, f, indent=1)
  print(f"total {time.time() - started:.1f} s", flush=True)


FIGURES = ("macro_f1", "recall_malignant", "recall_benign", "recall_normal",
           "accuracy", "ece", "auc_malignant", "flagged_share",
           "accuracy_unflagged")


def score(directory: str, results_file: str,
          target_accuracy: Optional[float] = None) -> Dict[str, Dict]:
  """`cv`'s figures of each variant (and "+flip": logits averaged with the
  mirror image's), the temperature and threshold (for `target_accuracy`,
  default schemas.DEFAULT_TARGET_ACCURACY) fitted on each fold's validation
  images as `cv` fits them."""
  import schemas  # pylint: disable=import-outside-toplevel
  from training import calibration, cv, recipe  # pylint: disable=import-outside-toplevel
  from training.config import TrainConfig  # pylint: disable=import-outside-toplevel
  names = list(schemas.LABELS)
  # The recipe's calibration and threshold settings (only these are read).
  config = TrainConfig(data=(directory,), output="", target_accuracy=(
      schemas.DEFAULT_TARGET_ACCURACY if target_accuracy is None
      else target_accuracy))
  labels = np.load(os.path.join(directory, DATA_FILE))["labels"]
  results = np.load(results_file)
  variants = list(dict.fromkeys(key.split("/")[0] for key in results.files))
  report = {}
  for name in variants:
    folds = sorted({int(key.split("/")[1]) for key in results.files
                    if key.startswith(name + "/")})
    mirrored = f"{name}/{folds[0]}/val_mirror_logits" in results.files
    for flip in (False, True) if mirrored else (False,):
      per_fold = []
      for k in folds:
        def logits(split_name):
          value = results[f"{name}/{k}/{split_name}_logits"].astype(np.float64)
          if flip:
            value = (value + results[f"{name}/{k}/{split_name}_mirror_logits"]
                    ) / 2
          return value
        val, test = results[f"{name}/{k}/val"], results[f"{name}/{k}/test"]
        val_logits, test_logits = logits("val"), logits("test")
        # As cv's _fold: temperature, then threshold, on validation.
        fit = recipe.fit_calibration(config, val_logits, labels[val])
        flagging = recipe.choose_flagging(
            config, recipe.confidence(val_logits, labels[val],
                                      fit.temperature),
            recipe.confidence(test_logits, labels[test], fit.temperature),
            fit.block["fitted"])
        per_fold.append(cv.fold_metrics(
            labels[test], calibration.softmax(test_logits, fit.temperature),
            flagging["threshold"], names, config.threshold))
      report[name + ("+flip" if flip else "")] = {
          "folds": len(folds), "summary": cv.summarise(per_fold),
          "macro_f1_per_fold": [round(f["macro_f1"], 4) for f in per_fold]}
  return report


def format_table(report: Dict[str, Dict]) -> str:
  lines = ["variant          folds " + " ".join(f"{c[:16]:>16s}"
                                               for c in FIGURES)]
  for name, entry in report.items():
    cells = []
    for figure in FIGURES:
      value = entry["summary"][figure]
      cells.append(f"{value['mean']:.3f} ± {value['sd'] or 0:.3f}".rjust(16)
                   if value["mean"] is not None else "–".rjust(16))
    lines.append(f"{name:16s} {entry['folds']:5d} " + " ".join(cells))
  return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m bench.torch_finetune",
                                   allow_abbrev=False,
                                   description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  exporting = commands.add_parser("export", allow_abbrev=False)
  exporting.add_argument("--data", action="append", required=True)
  exporting.add_argument("--backbone_weights", required=True,
                         help="A Keras VGG16 notop .h5")
  exporting.add_argument("--output", required=True)
  exporting.add_argument("--folds", type=int, default=5)
  exporting.add_argument("--seed", type=int, default=0)
  running = commands.add_parser("run", allow_abbrev=False)
  running.add_argument("directory")
  running.add_argument("--output", required=True)
  running.add_argument("--variants", nargs="+", default=list(VARIANTS),
                       help=f"Default: all of {', '.join(VARIANTS)}.")
  scoring = commands.add_parser("score", allow_abbrev=False)
  scoring.add_argument("directory")
  scoring.add_argument("results")
  scoring.add_argument("--json", default=None, help="Also write the report.")
  args = parser.parse_args(argv)
  if args.command == "export":
    print(json.dumps(export(args.data, args.backbone_weights, args.output,
                            args.folds, args.seed)))
  elif args.command == "run":
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
      parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    run(args.directory, args.output, args.variants)
  else:
    report = score(args.directory, args.results)
    print(format_table(report))
    if args.json:
      with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
