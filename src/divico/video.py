"""Read videos for Video-LLaVA / Qwen2-VL: N frames sampled uniformly from an mp4/avi file with PyAV (``av``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm")


def _import_av():
    try:
        import av
    except ImportError as error:
        raise ImportError("Reading video files needs PyAV: pip install av (or pip install 'divico[video]').") from error
    return av


def uniform_frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """Indices of ``num_frames`` frames spread evenly over ``total_frames`` (the centre of each equal segment).

    Raises
    ------
    ValueError
        If ``num_frames`` is not in [1, total_frames].
    """
    if not 1 <= num_frames <= total_frames:
        raise ValueError(f"num_frames must be in [1, {total_frames}] for a {total_frames}-frame video, got {num_frames}.")
    return [int((i + 0.5) * total_frames / num_frames) for i in range(num_frames)]


def read_video_frames(path: str | Path, num_frames: int = 8) -> np.ndarray:
    """Decode ``num_frames`` uniformly sampled RGB frames.

    Parameters
    ----------
    path
        Video file (mp4, avi, ...).
    num_frames
        Frames to return, in [1, frames in the file].

    Returns
    -------
    numpy.ndarray
        (num_frames, height, width, 3) uint8, in temporal order.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file has no video stream or fewer than ``num_frames`` frames.
    ImportError
        If PyAV is missing (the message names ``pip install av``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No video file at {path}.")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int):
        raise TypeError(f"num_frames must be an integer >= 1, got {num_frames!r}.")
    av = _import_av()
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream.")
        declared = int(container.streams.video[0].frames or 0)
        if declared >= num_frames:
            # Convert only the sampled frames (a 720p clip is ~2.7 MB per RGB frame).
            wanted = uniform_frame_indices(declared, num_frames)
            picked = {}
            for index, frame in enumerate(container.decode(video=0)):
                if index in wanted:
                    picked[index] = frame.to_ndarray(format="rgb24")
            if len(picked) == num_frames:
                return np.stack([picked[i] for i in wanted])
    # The container's frame count was missing or wrong: count what actually decodes.
    with av.open(str(path)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path} has no decodable video frames.")
    indices = uniform_frame_indices(len(frames), num_frames)
    return np.stack([frames[i] for i in indices])


def write_video_frames(path: str | Path, frames: np.ndarray, fps: int = 10) -> Path:
    """Write (T, H, W, 3) uint8 RGB frames to an mp4 (H.264 when available, else MPEG-4) or avi (MPEG-4) file.

    Raises
    ------
    ValueError
        If ``frames`` is not (T, H, W, 3) uint8 with even H and W.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got shape {frames.shape} dtype {frames.dtype}.")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frame height and width must be even for yuv420p video, got {frames.shape[1:3]}.")
    av = _import_av()
    path = Path(path)
    codec = "mpeg4"
    if path.suffix.lower() == ".mp4" and "libx264" in av.codecs_available:
        codec = "libx264"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
