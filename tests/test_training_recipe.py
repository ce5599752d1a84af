"""The recipe's pieces: fixed views, the conv cache, early stopping."""

import keras
import numpy as np
import pytest

import schemas
from training import augment, model as model_lib, recipe, testing
from training.config import TrainConfig

SIZE = 32


@pytest.fixture(name="images", scope="module")
def fixture_images():
  return testing.every_class_images(8, SIZE)


def test_views_are_fixed_and_geometric(images):
  batch = images[:4]
  assert recipe.view_images(batch, recipe.ORIGINAL, 0) is batch
  np.testing.assert_array_equal(recipe.view_images(batch, recipe.MIRROR, 0),
                                batch[:, :, ::-1])
  first = recipe.view_images(batch, 2, seed=7)
  assert first.dtype == np.uint8 and first.shape == batch.shape
  np.testing.assert_array_equal(first, recipe.view_images(batch, 2, seed=7))
  assert not np.array_equal(first, batch)
  assert not np.array_equal(first, recipe.view_images(batch, 3, seed=7))
  assert not np.array_equal(first, recipe.view_images(batch, 2, seed=8))
  # A geometric change only: the grey levels stay in the image's range.
  assert first.max() <= batch.max() and first.min() >= batch.min()


def test_every_second_random_view_is_degraded(images):
  assert [v for v in range(9) if recipe.degraded_view(v)] == [3, 5, 7]
  positions = np.arange(len(images))
  for view in (2, 4):  # geometry only, degrade or not
    np.testing.assert_array_equal(
        recipe.view_images(images, view, 0, positions, degrade=True),
        recipe.view_images(images, view, 0, positions))
  geometric = recipe.view_images(images, 3, 0, positions)
  degraded = recipe.view_images(images, 3, 0, positions, degrade=True)
  assert not np.array_equal(degraded, geometric)
  # The same geometry underneath, then each image's own degradation draw.
  np.testing.assert_array_equal(
      degraded[5], augment.degrade(geometric[5],
                                   np.random.default_rng([0, 3, 5])))
  np.testing.assert_array_equal(
      recipe.view_images(images[5:6], 3, 0, [5], degrade=True), degraded[5:6])


def test_annotations_go_on_about_half_of_each_random_view(images):
  positions = np.arange(len(images))
  for view in (recipe.ORIGINAL, recipe.MIRROR):  # as stored, never marked
    np.testing.assert_array_equal(
        recipe.view_images(images, view, 0, positions, annotate=True),
        recipe.view_images(images, view, 0, positions))
  for view in (2, 3):
    plain = recipe.view_images(images, view, 0, positions)
    marked = recipe.view_images(images, view, 0, positions, annotate=True)
    changed = [not np.array_equal(a, b) for a, b in zip(plain, marked)]
    assert 4 <= sum(changed) <= 20, (view, sum(changed))  # of 24, p = 0.5
    # The same geometry underneath, then each image's own draw.
    first = changed.index(True)
    np.testing.assert_array_equal(marked[first], augment.annotate(
        plain[first], _annotate_rng(0, view, first)))
  # Annotations come before the degradations, whose draws stay the
  # recipe's: an image without marks is degraded exactly as without
  # --annotate.
  both = recipe.view_images(images, 3, 0, positions, degrade=True,
                            annotate=True)
  degraded = recipe.view_images(images, 3, 0, positions, degrade=True)
  plain = recipe.view_images(images, 3, 0, positions)
  for k in positions:
    rng = np.random.default_rng([0, 3, int(k), 1])
    if rng.random() < augment.ANNOTATE.probability:
      np.testing.assert_array_equal(both[k], augment.degrade(
          augment.annotate(plain[k], rng), np.random.default_rng([0, 3, k])))
    else:
      np.testing.assert_array_equal(both[k], degraded[k])


def _annotate_rng(seed, view, key):
  """The generator view_images draws an image's annotations from, after its
  yes-or-no draw."""
  rng = np.random.default_rng([seed, view, key, 1])
  rng.random()
  return rng


def test_an_images_view_does_not_depend_on_its_batch(images):
  # train without cv computes the views of its training images only, cv of
  # every image: each image must get the same view either way.
  everything = recipe.view_images(images, 2, 3, np.arange(len(images)))
  some = np.array([17, 4, 9])
  np.testing.assert_array_equal(
      recipe.view_images(images[some], 2, 3, some), everything[some])
  np.testing.assert_array_equal(
      recipe.view_images(images[9:10], 2, 3, [9]), everything[9:10])
  # The key is the draw: the same pixels under another key are viewed
  # otherwise.
  assert not np.array_equal(recipe.view_images(images[9:10], 2, 3, [10]),
                            everything[9:10])


def test_draw_keys_follow_the_image_not_its_position(images):
  ids = [f"{i:064x}" for i in range(len(images))]
  keys = recipe.draw_keys(ids)
  assert keys.dtype == np.int64 and (keys >= 0).all()
  assert len(set(keys.tolist())) == len(ids)
  # A key is the image's own: the others' do not enter it.
  np.testing.assert_array_equal(recipe.draw_keys(ids[5:9]), keys[5:9])


def test_an_added_image_redraws_no_other_images_views(images):
  # What cv and train cache: the views of the images of one data set and of
  # the same data set with an image added before them all.
  from training import cv, data as data_lib  # pylint: disable=import-outside-toplevel
  config = TrainConfig(data=("x",), output="x", backbone="tiny",
                       backbone_weights="none", augment_views=3)
  model = model_lib.build_model(SIZE, "none", 3, model_lib.TINY)
  labels = np.repeat(np.arange(3), 8)
  ids = [f"{i + 1:064x}" for i in range(len(images))]
  data = data_lib.LabelledData(images, labels, ids, ["s"] * len(ids))
  extra = np.full_like(images[:1], 128)
  grown = data_lib.LabelledData(np.concatenate([extra, images]),
                                np.r_[0, labels], ["0" * 64] + ids,
                                ["s"] * (len(ids) + 1))
  layer = model_lib.FEATURES_LAYER
  before = cv.all_views_cache(config, model, data, [layer])
  after = cv.all_views_cache(config, model, grown, [layer])
  for view in (2, 3):  # a geometric and a degraded random view
    np.testing.assert_allclose(
        after.get(layer, view, np.arange(1, len(ids) + 1)),
        before.get(layer, view, np.arange(len(ids))), rtol=1e-5, atol=1e-5)


def test_cache_draws_views_from_its_keys(images):
  model = model_lib.build_model(SIZE, "none", 3, model_lib.TINY)
  keys = recipe.draw_keys([f"image{i}" for i in range(len(images))])
  cache = recipe.ConvCache(model, images, {2: np.arange(len(images))}, 8, 0,
                           [model_lib.FEATURES_LAYER], keys=keys)
  direct = model_lib.sub_model(model, None, model_lib.FEATURES_LAYER)
  np.testing.assert_allclose(
      cache.get(model_lib.FEATURES_LAYER, 2, [4, 7]),
      np.asarray(direct(recipe.view_images(images[[4, 7]], 2, 0,
                                           keys[[4, 7]]))),
      rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="3 draw keys for 24 images"):
    recipe.ConvCache(model, images, {0: np.arange(3)}, 8, 0,
                     [model_lib.FEATURES_LAYER], keys=keys[:3])


def test_cache_matches_the_model_and_refuses_missing_views(images):
  model = model_lib.build_model(SIZE, "none", 3, model_lib.TINY)
  indices = np.array([1, 5, 9, 20])
  cut = model_lib.fine_tune_input(model)
  cache = recipe.ConvCache(model, images, {0: np.arange(len(images)),
                                           1: indices}, 8, 0,
                           [cut, model_lib.FEATURES_LAYER],
                           keys=np.arange(len(images)))
  direct = model_lib.sub_model(model, None, model_lib.FEATURES_LAYER)
  mirrored = np.ascontiguousarray(images[indices][:, :, ::-1])
  np.testing.assert_allclose(
      cache.get(model_lib.FEATURES_LAYER, 1, indices[::-1]),
      np.asarray(direct(mirrored[::-1])), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      cache.get(model_lib.FEATURES_LAYER, 0, [3]),
      np.asarray(direct(images[3:4])), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="view 1"):
    cache.get(model_lib.FEATURES_LAYER, 1, [2])
  assert cache.seconds > 0


def _tiny_runner(images, progress=0, **fields):
  """A Recipe on the tiny backbone (seed 0) with one view besides the
  originals: even images train, odd ones validate."""
  labels = np.repeat(np.arange(3), 8)
  keras.utils.set_random_seed(0)
  model = model_lib.build_model(SIZE, "none", 3, model_lib.TINY)
  config = TrainConfig(data=("x",), output="x", backbone="tiny",
                       backbone_weights="none", augment_views=1, **fields)
  train, val = np.arange(0, 24, 2), np.arange(1, 24, 2)
  cache = recipe.ConvCache(model, images, {0: np.arange(24), 1: train}, 8, 0,
                           recipe.cache_layers(config, model),
                           keys=np.arange(24))
  return (recipe.Recipe(model, cache, labels, config, progress=progress),
          train, val)


def test_epoch_log_logs_the_first_and_last_epochs_and_one_line_a_period(
    caplog):
  now = [0.0]
  log = recipe.EpochLog("head", 35, every=10.0, clock=lambda: now[0])
  log.on_train_begin()
  with caplog.at_level("INFO", logger=recipe.__name__):
    for epoch in range(35):
      now[0] += 1.0  # a second an epoch
      log.on_epoch_end(epoch, {"loss": 2.0 - epoch / 100,
                               "val_loss": 1.0 + abs(epoch - 20) / 100})
  lines = [r.getMessage() for r in caplog.records]
  assert [line.split(",")[0] for line in lines] == [
      f"Stage head: epoch {n}/35" for n in (1, 11, 21, 31, 35)]
  assert lines[0] == ("Stage head: epoch 1/35, loss 2.0000, val_loss 1.2000"
                      " (best val_loss 1.2000, epoch 1); 1.00 s an epoch")
  assert lines[-1] == ("Stage head: epoch 35/35, loss 1.6600, val_loss"
                       " 1.1400 (best val_loss 1.0000, epoch 21); 1.00 s an"
                       " epoch")


def test_epoch_log_logs_the_last_epoch_of_a_stage_stopped_early(caplog):
  now = [0.0]
  log = recipe.EpochLog("head", 300, every=10.0, clock=lambda: now[0])
  log.on_train_begin()
  with caplog.at_level("INFO", logger=recipe.__name__):
    for epoch in range(57):
      now[0] += 0.1
      log.on_epoch_end(epoch, {"loss": 1.0, "val_loss": 1.0})
    log.on_train_end()
  assert [r.getMessage().split(",")[0] for r in caplog.records] == [
      "Stage head: epoch 1/300", "Stage head: epoch 57/300"]
  # A stage whose last epoch was logged already does not log it twice.
  caplog.clear()
  with caplog.at_level("INFO", logger=recipe.__name__):
    log.on_train_end()
  assert not caplog.records


def test_a_stage_logs_a_few_lines_not_one_an_epoch(images, caplog, capsys):
  runner, train, val = _tiny_runner(images, progress=None, epochs=40,
                                    patience=40, learning_rate=1e-3)
  with caplog.at_level("INFO", logger=recipe.__name__):
    fitted = runner.fit(train, val, 0)
  assert "Epoch" not in capsys.readouterr().out  # no Keras lines
  lines = [r.getMessage() for r in caplog.records]
  epochs = [line for line in lines if line.startswith("Stage head: epoch")]
  assert epochs[0].startswith("Stage head: epoch 1/40, loss ")
  assert epochs[-1].startswith("Stage head: epoch 40/40, loss ")
  assert len(epochs) < 10
  best = fitted.best_epoch["head"]
  assert lines[-1].startswith(
      f"Stage head: 40 of 40 epochs run, the weights of epoch {best} kept"
      f" (the lowest val_loss, {min(fitted.history['val_loss']):.4f}) in ")


@pytest.mark.slow
def test_early_stopping_keeps_the_best_epoch(images):
  runner, train, val = _tiny_runner(images, epochs=60, patience=3,
                                    learning_rate=0.05)
  model, cache, labels, config = (runner.model, runner.cache, runner.labels,
                                  runner.config)
  fitted = runner.fit(train, val, 0)
  run, best = fitted.epochs_run["head"], fitted.best_epoch["head"]
  losses = fitted.history["val_loss"]
  assert len(losses) == run <= 60 and best == int(np.argmin(losses)) + 1
  if run < 60:  # it stopped: `patience` epochs after the best one
    assert run == best + config.patience
  # The weights kept are the best epoch's: its validation loss again.
  head = model_lib.sub_model(model, model_lib.FEATURES_LAYER, None)
  loss = keras.losses.CategoricalCrossentropy(
      label_smoothing=config.label_smoothing)
  again = float(loss(recipe.one_hot(labels[val], 3),
                     head(cache.get(model_lib.FEATURES_LAYER, 0, val))))
  assert again == pytest.approx(min(losses), rel=1e-4, abs=1e-5)
  assert fitted.seconds["head"] > 0


def test_a_stage_whose_best_epoch_is_its_last_says_so(images, caplog):
  runner, train, val = _tiny_runner(images, epochs=2, patience=5,
                                    learning_rate=1e-3)
  with caplog.at_level("INFO", logger=recipe.__name__):
    fitted = runner.fit(train, val, 0)
  losses = fitted.history["val_loss"]
  assert fitted.best_epoch["head"] == fitted.epochs_run["head"] == 2, losses
  assert ("Stage head: the validation loss was still falling at the last of"
          " its 2 epochs; more (--epochs)") in caplog.text
  # A stage that stopped before its last epoch, or kept an earlier one,
  # does not.
  caplog.clear()
  runner, train, val = _tiny_runner(images, epochs=60, patience=2,
                                    learning_rate=0.05)
  with caplog.at_level("INFO", logger=recipe.__name__):
    fitted = runner.fit(train, val, 0)
  assert fitted.best_epoch["head"] < fitted.epochs_run["head"]
  assert "still falling" not in caplog.text


@pytest.mark.parametrize("fields, layer", [
    ({}, model_lib.LOGITS_LAYER),
    # The fine-tune stage's rows come in StageRows' order, drawn from the
    # fit's seed too.
    ({"fine_tune_epochs": 2, "fine_tune_learning_rate": 0.01},
     schemas.GRADCAM_LAYER)])
def test_a_fit_depends_on_its_seed_not_on_the_fits_before_it(images, fields,
                                                             layer):
  # cv fits every fold on one model, and train its final model after them:
  # the dropout masks must come from the fit's seed, not from the state the
  # Dropout layer's generator was left in (set_random_seed does not reset
  # it, nor does set_weights).
  runner, train, val = _tiny_runner(images, epochs=3, patience=0,
                                    learning_rate=0.05, batch_size=4,
                                    **fields)
  model = runner.model
  initial = model.get_weights()

  def kernel_after_fit(seed):
    model.set_weights(initial)
    runner.fit(train, val, seed)
    return model.get_layer(layer).get_weights()[0]

  first = kernel_after_fit(5)
  other = kernel_after_fit(6)  # moves the dropout generator on
  again = kernel_after_fit(5)
  np.testing.assert_array_equal(again, first)
  assert not np.array_equal(other, first)


def test_a_cosine_fine_tune_rate_falls_to_zero_over_the_stage(images,
                                                               monkeypatch):
  rates = []
  real = model_lib.compile_model

  def compile_model(model, learning_rate, label_smoothing=0.0,
                    ema_momentum=0.0):
    rates.append(learning_rate)
    real(model, learning_rate, label_smoothing, ema_momentum)

  monkeypatch.setattr(model_lib, "compile_model", compile_model)
  fields = dict(epochs=2, patience=0, learning_rate=0.05, batch_size=4,
                fine_tune_epochs=3, fine_tune_learning_rate=0.01)
  kernels, fine_tune_rates = {}, {}
  for schedule in schemas.FINE_TUNE_SCHEDULES:
    runner, train, val = _tiny_runner(images, fine_tune_schedule=schedule,
                                      **fields)
    rates.clear()
    fitted = runner.fit(train, val, 0)
    assert fitted.epochs_run == {"head": 2, recipe.FINE_TUNE: 3}
    head, fine_tune_rates[schedule] = rates
    assert head == 0.05  # the head's rate is held whatever the schedule
    kernels[schedule] = runner.model.get_layer(
        schemas.GRADCAM_LAYER).get_weights()[0]
  assert fine_tune_rates["constant"] == 0.01
  fine_tune = fine_tune_rates["cosine"]
  assert fine_tune != 0.01
  # 12 training images x 2 views, 4 rows a batch: 6 steps an epoch, 18 in
  # the stage's 3 epochs; from the rate given down to 0 along a cosine.
  assert fine_tune.decay_steps == 18
  for step, expected in ((0, 0.01), (9, 0.005), (18, 0.0), (30, 0.0)):
    assert float(fine_tune(step)) == pytest.approx(expected, abs=1e-9)
  # The same seed, rows and dropout draws: only the rate differs.
  assert not np.array_equal(kernels["cosine"], kernels["constant"])
  constant = TrainConfig(data=("x",), output="x")
  assert recipe.fine_tune_rate(constant, 0.01, 18) == 0.01


class _StepWeights(keras.callbacks.Callback):
  """The trained weights after every step (before any epoch-end swap)."""

  def __init__(self):
    super().__init__()
    self.steps, self.epoch_ends = [], []

  def on_train_batch_end(self, batch, logs=None):
    self.steps.append(self._weights())

  def on_epoch_end(self, epoch, logs=None):
    self.epoch_ends.append(len(self.steps))

  def on_train_end(self, logs=None):
    # After fit wrote in the average, if any (and after the callbacks
    # before this one: early stopping's restore).
    self.kept = self._weights()

  def _weights(self):
    return [np.array(w) for w in self.model.trainable_weights]


def _averages(steps, momentum):
  """Keras' moving average by hand: the first step's weights, then
  momentum * average + (1 - momentum) * weights after each step."""
  averages, average = [], None
  for weights in steps:
    average = (weights if average is None else
               [momentum * a + (1 - momentum) * w
                for a, w in zip(average, weights)])
    averages.append(average)
  return averages


def _assert_kept_the_average(kept, averages, raws):
  """Each kept weight is its average, not the raw weight of that step."""
  assert len(kept) == len(averages) == len(raws)
  for weight, average, raw in zip(kept, averages, raws):
    np.testing.assert_allclose(np.array(weight), average, rtol=1e-4,
                               atol=1e-6)
    assert not np.allclose(np.array(weight), raw, rtol=1e-4, atol=1e-6)


@pytest.fixture(name="recorders")
def fixture_recorders(monkeypatch):
  """Every stage's _StepWeights, in the order the stages ran."""
  recorders = []
  real = recipe.stage_callbacks

  def stage_callbacks(config, validated, ema_momentum):
    recorders.append(_StepWeights())
    return real(config, validated, ema_momentum) + [recorders[-1]]

  monkeypatch.setattr(recipe, "stage_callbacks", stage_callbacks)
  return recorders


@pytest.mark.parametrize("patience", [3, 0])
def test_weight_averaging_validates_stops_on_and_keeps_the_average(
    images, recorders, patience):
  momentum = 0.8
  runner, train, val = _tiny_runner(images, epochs=40, patience=patience,
                                    learning_rate=0.05, batch_size=4,
                                    ema_momentum=momentum)
  fitted = runner.fit(train, val, 0)
  run = fitted.epochs_run["head"]
  losses = fitted.history["val_loss"]
  if patience:
    # Stopped early: fit wrote the last epoch's raw weights, and the best
    # epoch's average must have replaced them.
    assert run < 40
    best = fitted.best_epoch["head"]
  else:
    assert run == 40
    best = run
  steps = recorders[0].steps
  step = recorders[0].epoch_ends[best - 1] - 1  # the kept epoch's last
  head = model_lib.sub_model(runner.model, model_lib.FEATURES_LAYER, None)
  _assert_kept_the_average(head.trainable_weights,
                           _averages(steps, momentum)[step], steps[step])
  # The validation loss of that epoch was the averaged weights' own.
  loss = keras.losses.CategoricalCrossentropy(
      label_smoothing=runner.config.label_smoothing)
  again = float(loss(recipe.one_hot(runner.labels[val], 3),
                     head(runner.cache.get(model_lib.FEATURES_LAYER, 0, val))))
  assert again == pytest.approx(losses[best - 1], rel=1e-4, abs=1e-5)


def test_a_bfloat16_fine_tune_keeps_its_average_in_the_model(images,
                                                             recorders):
  # The fine-tune stage trains a bfloat16 copy and copies its weights back:
  # the average must come back, not the copy's raw weights.
  momentum = 0.8
  runner, train, val = _tiny_runner(images, epochs=2, patience=0,
                                    learning_rate=0.05, batch_size=4,
                                    fine_tune_epochs=3,
                                    fine_tune_learning_rate=0.01,
                                    precision="bfloat16",
                                    ema_momentum=momentum)
  fitted = runner.fit(train, val, 0)
  assert fitted.epochs_run == {"head": 2, recipe.FINE_TUNE: 3}
  steps = recorders[1].steps
  cut = model_lib.fine_tune_input(runner.model, None)
  _assert_kept_the_average(
      model_lib.sub_model(runner.model, cut, None).trainable_weights,
      _averages(steps, momentum)[-1], steps[-1])


@pytest.mark.parametrize("head,fine_tune", [(0.8, 0.0), (0.0, 0.8)])
def test_each_stage_averages_with_its_own_momentum(images, recorders, head,
                                                   fine_tune):
  runner, train, val = _tiny_runner(images, epochs=2, patience=0,
                                    learning_rate=0.05, batch_size=4,
                                    fine_tune_epochs=3,
                                    fine_tune_learning_rate=0.01,
                                    ema_momentum=head,
                                    fine_tune_ema_momentum=fine_tune)
  fitted = runner.fit(train, val, 0)
  assert fitted.epochs_run == {"head": 2, recipe.FINE_TUNE: 3}
  for recorder, momentum in zip(recorders, (head, fine_tune)):
    if momentum:
      _assert_kept_the_average(recorder.kept,
                               _averages(recorder.steps, momentum)[-1],
                               recorder.steps[-1])
    else:  # the stage's raw weights after its last step
      assert len(recorder.kept) == len(recorder.steps[-1])
      for kept, raw in zip(recorder.kept, recorder.steps[-1]):
        np.testing.assert_array_equal(kept, raw)
  # What the fine-tune kept is the model's.
  cut = model_lib.fine_tune_input(runner.model, None)
  for weight, kept in zip(
      model_lib.sub_model(runner.model, cut, None).trainable_weights,
      recorders[1].kept):
    np.testing.assert_array_equal(np.array(weight), kept)


def test_no_weight_averaging_by_default_and_none_outside_0_to_1():
  config = TrainConfig(data=("x",), output="x")
  assert config.ema_momentum == 0.0 and config.fine_tune_ema == 0.0
  assert not any(isinstance(c, keras.callbacks.SwapEMAWeights)
                 for c in recipe.stage_callbacks(config, validated=True,
                                                 ema_momentum=0.0))
  for name in ("ema_momentum", "fine_tune_ema_momentum"):
    for momentum in (1.0, -0.1, float("nan")):
      with pytest.raises(ValueError, match=f"--{name} "):
        TrainConfig(data=("x",), output="x", **{name: momentum}).validate()


def test_the_fine_tune_averages_as_the_head_stage_unless_told():
  def momenta(**fields):
    config = TrainConfig(data=("x",), output="x", **fields)
    return (recipe.stage_momentum(config, "head"),
            recipe.stage_momentum(config, recipe.FINE_TUNE))

  assert momenta() == (0.0, 0.0)
  assert momenta(ema_momentum=0.99) == (0.99, 0.99)
  assert momenta(ema_momentum=0.99, fine_tune_ema_momentum=0.0) == (0.99, 0.0)
  assert momenta(fine_tune_ema_momentum=0.9) == (0.0, 0.9)
  # Resolved, the auto is written down (reports and artifacts record it).
  resolved = recipe.resolved(TrainConfig(
      data=("x",), output="x", ema_momentum=0.99, fine_tune_epochs=1,
      precision="float32"))
  assert resolved.fine_tune_ema_momentum == 0.99


def test_stage_rows_bring_every_row_once_an_epoch_in_a_seeded_order(images):
  model = model_lib.build_model(SIZE, "none", 3, model_lib.TINY)
  layer = model_lib.fine_tune_input(model)
  train = np.array([3, 0, 7, 5, 11])
  cache = recipe.ConvCache(model, images, {0: np.arange(24), 1: train,
                                           2: train}, 8, 0, [layer],
                           keys=np.arange(24), precision="bfloat16")
  targets = recipe.one_hot(np.array([0, 1, 2, 2, 1]), 3)
  views = [0, 1, 2]
  # The rows a stage trained on before, all at once: view after view.
  stacked = cache.stack(layer, views, train, np.float32)
  stacked_targets = np.tile(targets, (3, 1))

  def epoch(rows):
    batches = [rows[i] for i in range(len(rows))]
    assert [len(x) for x, _ in batches] == [4, 4, 4, 3]
    assert all(x.dtype == np.float32 for x, _ in batches)
    return (np.concatenate([x for x, _ in batches]),
            np.concatenate([y for _, y in batches]))

  rows = recipe.StageRows(cache, layer, views, train, targets, 4, seed=3)
  assert len(rows) == 4
  with pytest.raises(IndexError):
    rows[4]  # pylint: disable=pointless-statement
  x, y = epoch(rows)
  order = rows.order
  # Every row once, in the epoch's order, its target beside it (the
  # bfloat16 views converted exactly).
  np.testing.assert_array_equal(np.sort(order), np.arange(15))
  np.testing.assert_array_equal(x, stacked[order])
  np.testing.assert_array_equal(y, stacked_targets[order])
  assert not np.array_equal(order, np.arange(15))
  # A new order the next epoch; the same orders from the same seed.
  rows.on_epoch_end()
  x2, _ = epoch(rows)
  assert not np.array_equal(rows.order, order)
  np.testing.assert_array_equal(x2, stacked[rows.order])
  again = recipe.StageRows(cache, layer, views, train, targets, 4, seed=3)
  np.testing.assert_array_equal(again.order, order)
  assert not np.array_equal(
      recipe.StageRows(cache, layer, views, train, targets, 4, 4).order, order)
  with pytest.raises(ValueError, match="2 targets for 5 images"):
    recipe.StageRows(cache, layer, views, train, targets[:2], 4, 3)


def test_reseed_sets_the_dropout_generator_from_the_seed_alone():
  keras.utils.set_random_seed(0)
  model = model_lib.build_model(SIZE, "none", 3, model_lib.TINY)
  dropout = model.get_layer("head_dropout")
  x = np.ones((2, model_lib.HEAD_UNITS), np.float32)
  model_lib.reseed(model, 7)
  masks = np.asarray(dropout(x, training=True))
  dropout(x, training=True)
  model_lib.reseed(model, 7)
  np.testing.assert_array_equal(np.asarray(dropout(x, training=True)), masks)
  model_lib.reseed(model, 8)
  assert not np.array_equal(np.asarray(dropout(x, training=True)), masks)


def test_class_weights_are_balanced():
  weights = recipe.balanced_class_weights(np.array([0, 0, 0, 1]), 3)
  assert weights == {0: pytest.approx(4 / 6), 1: pytest.approx(2.0), 2: 1.0}


def test_malignant_weight_multiplies_the_malignant_class_only():
  labels = np.array([0, 0, 1, 1, 1, 2])  # normal, benign, malignant
  assert schemas.LABELS.index(schemas.MALIGNANT) == 2
  balanced = recipe.balanced_class_weights(labels, 3)
  assert balanced == {0: pytest.approx(1.0), 1: pytest.approx(2 / 3),
                      2: pytest.approx(2.0)}
  assert recipe.class_weights(labels, 3, 2.5) == {
      0: pytest.approx(1.0), 1: pytest.approx(2 / 3), 2: pytest.approx(5.0)}
  assert recipe.class_weights(labels, 3) == balanced
  # A model without the three classes has no malignant output to weight.
  assert recipe.class_weights(np.array([0, 1]), 2) == {0: 1.0, 1: 1.0}
  with pytest.raises(ValueError, match="--malignant_weight needs"):
    recipe.class_weights(np.array([0, 1]), 2, 2.0)


@pytest.mark.parametrize("first, trained, cached", [
    (None, ("block5_conv3",), "block1_pool"),
    ("block1_conv1", ("block1_conv1", "block5_conv3"),
     schemas.PREPROCESS_LAYER),
])
def test_fine_tune_trains_the_layers_from_fine_tune_from(images, first,
                                                         trained, cached):
  runner, train, val = _tiny_runner(
      images, epochs=1, patience=0, fine_tune_epochs=2, fine_tune_from=first,
      fine_tune_learning_rate=0.05)
  model = runner.model
  assert recipe.cache_layers(runner.config, model) == [
      cached, model_lib.FEATURES_LAYER]
  before = {name: model.get_layer(name).get_weights()[0].copy()
            for name in ("block1_conv1", "block5_conv3")}
  fitted = runner.fit(train, val, 0)
  assert fitted.fine_tuned == trained
  assert fitted.epochs_run == {"head": 1, "fine_tune": 2}
  for name, weights in before.items():
    changed = not np.array_equal(model.get_layer(name).get_weights()[0],
                                 weights)
    assert changed == (name in trained), name
  # Through the cache of the fine-tuned layers' input, the trained model's
  # logits are the full model's on the raw pixels.
  full = model_lib.sub_model(model, None, model_lib.LOGITS_LAYER)
  np.testing.assert_allclose(runner.logits(val),
                             np.asarray(full(images[val])), rtol=1e-4,
                             atol=1e-4)


def test_fine_tune_from_the_first_conv_caches_the_resized_pixels(images):
  # With --network_size the layer before block1_conv1 is the resize layer:
  # its outputs are cached, and logits through them are the full model's.
  labels = np.repeat(np.arange(3), 8)
  keras.utils.set_random_seed(0)
  model = model_lib.build_model(SIZE, "none", 3, model_lib.TINY, 48)
  config = TrainConfig(data=("x",), output="x", backbone="tiny",
                       backbone_weights="none", epochs=1, patience=0,
                       fine_tune_epochs=1, fine_tune_from="block1_conv1",
                       augment_views=0, network_size=48)
  layers = recipe.cache_layers(config, model)
  assert layers == [schemas.RESIZE_LAYER, model_lib.FEATURES_LAYER]
  cache = recipe.ConvCache(model, images, {0: np.arange(24)}, 8, 0, layers,
                           keys=np.arange(24))
  assert cache.get(schemas.RESIZE_LAYER, 0, [0]).shape == (1, 48, 48, 3)
  runner = recipe.Recipe(model, cache, labels, config, progress=0)
  runner.fit(np.arange(0, 24, 2), np.arange(1, 24, 2), 0)
  assert model_lib.frozen_prefix_end(model) == schemas.RESIZE_LAYER
  full = model_lib.sub_model(model, None, model_lib.LOGITS_LAYER)
  np.testing.assert_allclose(runner.logits(np.arange(6)),
                             np.asarray(full(images[:6])), rtol=1e-4,
                             atol=1e-4)


@pytest.mark.parametrize("network_size, layer", [
    (None, schemas.PREPROCESS_LAYER), (48, schemas.RESIZE_LAYER)])
def test_a_layer_of_the_pixels_is_kept_as_pixels_and_read_as_before(
    images, network_size, layer):
  # The whole base's rows (the preprocessed, or resized, pixels of every
  # view) are kept as the views' uint8 pixels and computed when read: the
  # same values as computing the layer once and keeping it, a quarter (a
  # half, for bfloat16 views) of the memory.
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  model = model_lib.build_model(SIZE, "none", 3, model_lib.TINY, network_size)
  layers = [model_lib.fine_tune_input(model, "block1_conv1"),
            model_lib.FEATURES_LAYER]
  assert layers[0] == layer
  every, some = np.arange(24), np.array([9, 2, 17, 4])
  cache = recipe.ConvCache(model, images, {0: every, 1: every, 3: some}, 8, 0,
                           layers, keys=every, degrade=True, annotate=True,
                           depth=True, precision="bfloat16")
  size = network_size or SIZE
  for view, indices, dtype in ((0, every, np.float32),
                               (1, every, ml_dtypes.bfloat16),
                               (3, some, ml_dtypes.bfloat16)):
    kept, rows = cache.sources(layer, [view], indices)[0]
    assert kept.dtype == np.uint8 and kept.shape == (len(indices), SIZE,
                                                     SIZE, 3)
    pixels = recipe.view_images(images[indices], view, 0, every[indices],
                                degrade=True, annotate=True, depth=True)
    np.testing.assert_array_equal(kept[rows], pixels)
    # What the layer computed once gave (original: float32, as scoring).
    precision = "float32" if view == 0 else "bfloat16"
    once = model_lib.in_batches(
        model_lib.reduced_precision_copy(
            model_lib.sub_model(model, None, layer), precision),
        pixels, 8, dtype=dtype)
    got = cache.get(layer, view, indices)
    assert got.dtype == dtype and got.shape == (len(indices), size, size, 3)
    np.testing.assert_array_equal(got, once)
    # The features below it are computed from those values.
    np.testing.assert_array_equal(
        cache.get(model_lib.FEATURES_LAYER, view, indices),
        model_lib.in_batches(model_lib.reduced_precision_copy(
            model_lib.sub_model(model, layer, model_lib.FEATURES_LAYER),
            precision), once, 8, dtype=dtype))
  # A stage's rows, a batch at a time or stacked: the layer's values.
  targets = recipe.one_hot(np.array([0, 1, 2, 1]), 3)
  rows = recipe.StageRows(cache, layer, [0, 1, 3], some, targets, 5, seed=1)
  x = np.concatenate([rows[i][0] for i in range(len(rows))])
  stacked = cache.stack(layer, [0, 1, 3], some, np.float32)
  np.testing.assert_array_equal(x, stacked[rows.order])
  np.testing.assert_array_equal(
      stacked[4:8], cache.get(layer, 1, some).astype(np.float32))
  # A layer with weights before it is kept as computed.
  deeper = recipe.ConvCache(model, images, {0: every}, 8, 0,
                            [model_lib.fine_tune_input(model)], keys=every)
  kept, _ = deeper.sources(model_lib.fine_tune_input(model), [0], every)[0]
  assert kept.dtype == np.float32


def test_fine_tune_from_must_name_a_base_layer_with_weights():
  model = model_lib.build_model(SIZE, "none", 3, model_lib.TINY)
  # Refused by the flags' check, before any data is read ...
  with pytest.raises(ValueError, match=r"--fine_tune_from 'block1_pool'.*"
                     r"one of: block1_conv1, block5_conv3"):
    TrainConfig(data=("x",), output="x", backbone="tiny", fine_tune_epochs=1,
                fine_tune_from="block1_pool").validate()
  with pytest.raises(ValueError, match="needs --fine_tune_epochs"):
    TrainConfig(data=("x",), output="x",
                fine_tune_from="block1_conv1").validate()
  TrainConfig(data=("x",), output="x", fine_tune_epochs=1,
              fine_tune_from="block3_conv2").validate()
  # ... and by the model itself for a name its base lacks.
  with pytest.raises(ValueError, match=r"--fine_tune_from 'block1_pool'.*"
                     r"one of: block1_conv1, block5_conv3"):
    model_lib.unfreeze_fine_tuned(model, "block1_pool")
  with pytest.raises(ValueError, match="'head_dense'"):
    model_lib.fine_tune_input(model, "head_dense")


def test_depth_deepens_some_random_views_from_a_stream_of_its_own(images):
  positions = np.arange(len(images))
  for view in (recipe.ORIGINAL, recipe.MIRROR):
    np.testing.assert_array_equal(
        recipe.view_images(images, view, 0, positions, depth=True),
        recipe.view_images(images, view, 0, positions))
  for view in (2, 3):
    plain = recipe.view_images(images, view, 0, positions, degrade=True,
                               annotate=True)
    deep = recipe.view_images(images, view, 0, positions, degrade=True,
                              annotate=True, depth=True)
    geometric = recipe.view_images(images, view, 0, positions)
    chosen = []
    for k in positions:
      rng = np.random.default_rng([0, view, int(k), 2])
      if rng.random() < augment.DEPTH.probability:
        chosen.append(k)
        # Deepened after the geometry, before the marks and degradations,
        # whose draws stay their own.
        assert not np.array_equal(deep[k], plain[k])
        np.testing.assert_array_equal(
            deep[k], _after_geometry(augment.deepen(geometric[k], rng),
                                     view, int(k)))
      else:
        np.testing.assert_array_equal(deep[k], plain[k])
    assert 1 <= len(chosen) <= 16, (view, chosen)  # of 24, p = 0.3


def _after_geometry(image, view, key):
  """What view_images does to one image after its geometric draw, with
  annotate and degrade on."""
  rng = np.random.default_rng([0, view, key, 1])
  if rng.random() < augment.ANNOTATE.probability:
    image = augment.annotate(image, rng)
  if recipe.degraded_view(view):
    image = augment.degrade(image, np.random.default_rng([0, view, key]))
  return image
