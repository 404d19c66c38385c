"""The shared exceptions: a RequestError is a ValueError whose text is its message, and carries its field."""

import pickle

import pytest

from pab.errors import RequestError, about


def test_a_request_error_is_a_value_error_with_its_message_as_text():
    e = RequestError("num_frames", "num_frames must be >= 1, got 0")
    assert isinstance(e, ValueError) and str(e) == "num_frames must be >= 1, got 0" and e.field == "num_frames"
    with pytest.raises(ValueError, match="^num_frames must be >= 1, got 0$"):  # what the existing callers match
        raise e


def test_it_survives_pickling_with_its_field():
    """Ray pickles an error raised on a group to send it back: the field must come along."""
    back = pickle.loads(pickle.dumps(RequestError("cache.spatial.blocks", "block 7 does not exist")))
    assert type(back) is RequestError and back.field == "cache.spatial.blocks" and str(back) == "block 7 does not exist"


def test_about_nests_a_request_errors_path_and_names_any_other_value_error():
    with pytest.raises(RequestError) as e:
        with about("cache"), about("spatial"):
            raise RequestError("range", "broadcast range must be an integer >= 1, got 0")
    assert e.value.field == "cache.spatial.range" and str(e.value) == "broadcast range must be an integer >= 1, got 0"
    with pytest.raises(RequestError) as e:
        with about("num_frames"):
            raise ValueError("the CausalVAE encodes 4k+1 frames")
    assert e.value.field == "num_frames" and str(e.value) == "the CausalVAE encodes 4k+1 frames"
    with pytest.raises(RequestError) as e:
        with about("cache"):
            raise RequestError("", "about the value as a whole")
    assert e.value.field == "cache"
    with pytest.raises(TypeError):  # not a request's value: passes through as it was
        with about("cache"):
            raise TypeError("a bug")
