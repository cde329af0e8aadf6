"""Classification metrics and calibration error against hand-computed values."""

import numpy as np
import pytest

from genforge.evaluate import (
    MetricError,
    calibration_from_confidences,
    classification_metrics,
    expected_calibration_error,
    reliability_diagram,
)

# TP 3, FN 1, FP 0, TN 2.
BINARY_TRUE = [0, 1, 1, 0, 1, 1]
BINARY_PRED = [0, 1, 0, 0, 1, 1]


def test_binary_metrics_hand_computed():
    result = classification_metrics(BINARY_TRUE, BINARY_PRED, average="binary")
    assert result["accuracy"] == pytest.approx(5 / 6)
    assert result["precision"] == pytest.approx(1.0)
    assert result["recall"] == pytest.approx(3 / 4)
    assert result["f1"] == pytest.approx(6 / 7)  # 2 * 1 * 0.75 / 1.75
    # Matthews: the determinant of the confusion matrix over the root of the product of its
    # four margins (predicted positive 3, actual positive 4, actual negative 2, predicted negative 3).
    assert result["mcc"] == pytest.approx(6 / np.sqrt(72))
    assert result.score == result["accuracy"]


def test_macro_average_hand_computed():
    # class 0: P 2/3, R 1, F1 0.8; class 1: P 1, R 3/4, F1 6/7
    result = classification_metrics(BINARY_TRUE, BINARY_PRED)
    assert result.settings["average"] == "macro"
    assert result["precision"] == pytest.approx((2 / 3 + 1) / 2)
    assert result["recall"] == pytest.approx((1 + 3 / 4) / 2)
    assert result["f1"] == pytest.approx((0.8 + 6 / 7) / 2)


def test_multiclass_hand_computed_and_string_labels():
    y_true = ["cat", "dog", "eel", "eel", "dog", "cat"]
    y_pred = ["cat", "eel", "eel", "eel", "dog", "dog"]
    # cat: P 1, R 1/2, F1 2/3; dog: P 1/2, R 1/2, F1 1/2; eel: P 2/3, R 1, F1 4/5
    result = classification_metrics(y_true, y_pred)
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["precision"] == pytest.approx((1 + 1 / 2 + 2 / 3) / 3)
    assert result["f1"] == pytest.approx((2 / 3 + 1 / 2 + 4 / 5) / 3)
    # Multiclass MCC (Gorodkin 2004): (c*s - sum_k p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)),
    # c = 4 correct, s = 6 samples, predicted counts p = (1, 2, 3), true counts t = (2, 2, 2).
    expected_mcc = (4 * 6 - (1 * 2 + 2 * 2 + 3 * 2)) / np.sqrt((36 - (1 + 4 + 9)) * (36 - 12))
    assert result["mcc"] == pytest.approx(expected_mcc)
    weighted = classification_metrics(y_true, y_pred, average="weighted")
    assert weighted["recall"] == pytest.approx(4 / 6)  # weighted recall is accuracy


def test_classification_bad_input():
    with pytest.raises(MetricError, match="6 true labels but 5 predicted"):
        classification_metrics(BINARY_TRUE, BINARY_PRED[:5])
    with pytest.raises(MetricError, match="no labels given"):
        classification_metrics([], [])
    with pytest.raises(MetricError, match="average 'samples' is unknown; accepted: binary, micro, macro, weighted"):
        classification_metrics(BINARY_TRUE, BINARY_PRED, average="samples")
    with pytest.raises(MetricError, match="multiclass"):
        classification_metrics([0, 1, 2], [0, 1, 2], average="binary")


# -------------------------------------------------------------------------------- calibration
def test_ece_hand_computed():
    # Bins (0, .5] and (.5, 1]. Low bin: {0.3}, accuracy 1, gap 0.7. High bin: {0.9, 0.8, 0.6},
    # accuracy 2/3, mean confidence 2.3/3, gap 0.1. ECE = 1/4 * 0.7 + 3/4 * 0.1 = 0.25.
    result = calibration_from_confidences([0.9, 0.8, 0.3, 0.6], [True, False, True, True], n_bins=2)
    assert result.ece == pytest.approx(0.25)
    assert result.mce == pytest.approx(0.7)
    assert [b.count for b in result.bins] == [1, 3]
    assert result.bins[1].accuracy == pytest.approx(2 / 3)
    assert result.bins[1].confidence == pytest.approx(2.3 / 3)


def test_bins_are_right_closed():
    # 0.5 belongs to (0, .5]: gaps 0.5 and 0.75, ECE 0.625. Left-closed bins would put both
    # in one bin (accuracy 0.5, confidence 0.625) and give 0.125.
    result = calibration_from_confidences([0.5, 0.75], [1, 0], n_bins=2)
    assert result.ece == pytest.approx(0.625)
    assert calibration_from_confidences([0.0, 1.0], [0, 1], n_bins=4).ece == pytest.approx(0.0)


def test_calibrated_predictions_have_zero_ece():
    result = calibration_from_confidences([0.7] * 10, [1] * 7 + [0] * 3, n_bins=10)
    assert result.ece == pytest.approx(0.0, abs=1e-12)
    assert sum(b.count for b in result.bins) == 10 and len(result.bins) == 10


def test_ece_from_class_probabilities():
    # Predictions 0, 1, 0, 1 with confidences .9, .75, .65, .7; right: yes, no, no, yes.
    # Bin (.8, 1]: gap 0.1, one sample. Bin (.6, .8]: accuracy 1/3, confidence 0.7, three samples.
    probabilities = [[0.9, 0.1], [0.25, 0.75], [0.65, 0.35], [0.3, 0.7]]
    result = expected_calibration_error(probabilities, [0, 0, 1, 1], n_bins=5)
    assert result.ece == pytest.approx(0.25 * 0.1 + 0.75 * (0.7 - 1 / 3))
    assert result.settings["n_bins"] == 5


def test_ece_binary_probabilities_of_class_one():
    # p = .9, .2, .5 -> predictions 1, 0, 0 (a tie predicts class 0), confidences .9, .8, .5;
    # labels 1, 0, 1 -> right, right, wrong. ECE = 1/3 * 0.5 + 2/3 * |1 - 0.85| = 0.2667.
    result = expected_calibration_error([0.9, 0.2, 0.5], [1, 0, 1], n_bins=2)
    assert result.ece == pytest.approx(1 / 3 * 0.5 + 2 / 3 * 0.15)


def test_calibration_bad_input():
    with pytest.raises(MetricError, match="logits"):
        expected_calibration_error([[2.0, -1.0]], [0])
    with pytest.raises(MetricError, match="row 1 sums to 0.5000"):
        expected_calibration_error([[0.5, 0.5], [0.25, 0.25]], [0, 1])
    with pytest.raises(MetricError, match="class indices from 0 to 1"):
        expected_calibration_error([[0.5, 0.5]], [2])
    with pytest.raises(MetricError, match="2 probability rows but labels of shape \\(3,\\)"):
        expected_calibration_error([[0.5, 0.5], [0.4, 0.6]], [0, 1, 1])
    with pytest.raises(MetricError, match="n_bins must be a positive integer"):
        calibration_from_confidences([0.5], [1], n_bins=0)
    with pytest.raises(MetricError, match="confidences is empty"):
        calibration_from_confidences([], [])


def test_reliability_diagram_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    confidences = rng.uniform(0.3, 1.0, size=200)
    correct = rng.uniform(size=200) < confidences**2  # overconfident
    result = calibration_from_confidences(confidences, correct, n_bins=10)
    path = reliability_diagram(result, tmp_path / "reliability.png")
    assert path == tmp_path / "reliability.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    from matplotlib.image import imread

    assert imread(path).shape[:2] == (500, 500)
    assert [p.name for p in tmp_path.iterdir()] == ["reliability.png"]  # no temp file left behind


def test_reliability_diagram_bad_path(tmp_path):
    result = calibration_from_confidences([0.9], [1], n_bins=2)
    with pytest.raises(MetricError, match="ending in .png"):
        reliability_diagram(result, tmp_path / "diagram.jpg")
    with pytest.raises(MetricError, match="does not exist"):
        reliability_diagram(result, tmp_path / "missing" / "diagram.png")
