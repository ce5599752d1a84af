"""The numpy fake model that wiring tests score with (tests/fakes.py)."""

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.ml.inference.base import RunInference
from apache_beam.testing.util import assert_that, equal_to

from tests import fakes
from tests.pipeline_helpers import make_test_pipeline


def test_fake_gives_deterministic_probabilities_by_intensity():
  images = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (10, 128, 250)])
  probabilities = fakes.predict(images)
  assert probabilities.dtype == np.float32 and probabilities.shape == (3, 3)
  np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
  # Dark, middle and bright images each favour another class.
  assert list(probabilities.argmax(axis=1)) == [0, 1, 2]
  np.testing.assert_array_equal(probabilities, fakes.predict(images))
  with pytest.raises(TypeError, match="uint8"):
    fakes.predict(images.astype(np.float32))


def test_fake_handler_through_run_inference():
  images = [np.full((4, 4, 3), v, np.uint8) for v in (10, 128, 250, 128)]
  with make_test_pipeline() as p:
    predicted = (p
                 | beam.Create(list(enumerate(images)))
                 | RunInference(fakes.keyed_handler("unused", batch_size=2))
                 | beam.MapTuple(lambda key, result: (
                     key, int(np.argmax(result.inference.probabilities)))))
    assert_that(predicted, equal_to([(0, 0), (1, 1), (2, 2), (3, 1)]))
