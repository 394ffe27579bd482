"""stages.extract.droid: golden actions, frame sampling, opening and decoding episodes, and every bad input."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import av
import h5py
import numpy as np
import pytest

from stages.cache.sampling import frame_grid, frame_stride
from stages.extract.droid import (
    CARTESIAN_KEY,
    GRIPPER_KEY,
    Episode,
    EpisodeError,
    actions_from_states,
    decode_frames,
    iter_frames,
    list_episodes,
    open_episode,
)

GOLDEN = Path(__file__).resolve().parents[2] / "golden"

# ----------------------------------------------------------------------------- actions


def test_actions_match_golden() -> None:
    golden = np.load(GOLDEN / "actions.npz")
    actions = actions_from_states(golden["states"])
    assert actions.shape == (11, 7) and actions.dtype == np.float64
    np.testing.assert_allclose(actions, golden["actions"], atol=1e-6, rtol=0)


def test_actions_pure_yaw_and_edge_cases() -> None:
    states = np.zeros((3, 7))
    states[:, 5] = [0.0, 0.1, 0.3]  # yaw only
    states[:, 0] = [0.0, 1.0, 3.0]
    states[:, 6] = [0.0, 0.5, 0.25]
    expected = np.zeros((2, 7))
    expected[:, 0] = [1.0, 2.0]
    expected[:, 5] = [0.1, 0.2]
    expected[:, 6] = [0.5, -0.25]
    np.testing.assert_allclose(actions_from_states(states), expected, atol=1e-12)
    assert actions_from_states(states[:1]).shape == (0, 7)
    with pytest.raises(ValueError):
        actions_from_states(np.zeros((4, 6)))


def test_actions_unaffected_by_roll_wrapping() -> None:
    # DROID stores roll near pi, jumping between +pi and -pi: the rotation difference must stay small.
    states = np.zeros((2, 7))
    states[:, 3] = [np.pi - 0.01, -np.pi + 0.01]
    assert np.abs(actions_from_states(states)[0, 3:6]).max() < 0.03


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(
    ("video_fps", "fps", "stride"),
    [(15, 4, 4), (15, 5, 3), (15, 15, 1), (30, 4, 8), (15, 3.75, 4), (14.9999999, 5, 3), (15.3, 5, 4), (10, 20, 1)],
)
def test_frame_stride(video_fps: float, fps: float, stride: int) -> None:
    assert frame_stride(video_fps, fps) == stride


def test_frame_stride_rejects_nonpositive() -> None:
    with pytest.raises(ValueError):
        frame_stride(15, 0)


def test_frame_grid_phases() -> None:
    np.testing.assert_array_equal(frame_grid(10, 4, 0), [0, 4, 8])
    np.testing.assert_array_equal(frame_grid(10, 4, 3), [3, 7])
    assert frame_grid(10, 4, 0).dtype == np.int64
    assert frame_grid(0, 4, 1).size == 0
    # the phases of one stride cover every usable index exactly once
    everything = np.sort(np.concatenate([frame_grid(23, 4, p) for p in range(4)]))
    np.testing.assert_array_equal(everything, np.arange(23))
    for stride, phase in [(4, 4), (4, -1), (0, 0)]:
        with pytest.raises(ValueError):
            frame_grid(10, stride, phase)


# ----------------------------------------------------------------------------- opening


def _h5_states(folder: Path) -> np.ndarray:
    with h5py.File(folder / "trajectory.h5", "r") as f:
        return np.concatenate([f[CARTESIAN_KEY][()], f[GRIPPER_KEY][()][:, None]], axis=1)


def _metadata(folder: Path) -> dict:
    return json.loads(next(folder.glob("metadata_*.json")).read_text())


def test_open_episode_reads_states_and_video(synthetic_episodes: list[Path]) -> None:
    for i, folder in enumerate(synthetic_episodes):
        episode = open_episode(folder)
        rows = _h5_states(folder)
        assert episode.num_rows == len(rows)
        short = i == 2  # short_video_every=3: the third episode's MP4s lack the last frame
        assert episode.num_video_frames == len(rows) - (1 if short else 0)
        assert episode.num_usable == min(episode.num_video_frames, episode.num_rows)
        assert episode.states.shape == (episode.num_usable, 7) and episode.states.dtype == np.float64
        np.testing.assert_array_equal(episode.states, rows[: episode.num_usable])
        assert episode.video_fps == pytest.approx(15.0)
        assert episode.frame_hw == (48, 64)
        assert episode.metadata["uuid"] in next(folder.glob("metadata_*.json")).name


def test_open_episode_camera_selection(synthetic_episodes: list[Path]) -> None:
    folder = synthetic_episodes[0]
    meta = _metadata(folder)
    for key, serial_key in [
        ("left_mp4_path", "ext1_cam_serial"),
        ("right_mp4_path", "ext2_cam_serial"),
        ("wrist_mp4_path", "wrist_cam_serial"),
        ("ext2_mp4_path", "ext2_cam_serial"),
    ]:
        episode = open_episode(folder, camera_key=key)
        assert episode.camera_key == key
        assert episode.serial == meta[serial_key]
        assert episode.video_path == folder / "recordings" / "MP4" / f"{meta[serial_key]}.mp4"
    default = open_episode(folder)
    assert default.camera_key == "left_mp4_path" and default.serial == meta["ext1_cam_serial"]


def test_source_files(synthetic_episodes: list[Path]) -> None:
    episode = open_episode(synthetic_episodes[1])
    files = episode.source_files()
    assert len(files) == 3 and all(f.is_file() for f in files)
    assert files[0].name.startswith("metadata_") and files[1].name == "trajectory.h5"
    assert files[2] == episode.video_path


def test_episode_states_are_read_only(synthetic_episodes: list[Path]) -> None:
    episode = open_episode(synthetic_episodes[0])
    assert isinstance(episode, Episode)
    with pytest.raises(ValueError):
        episode.states[0, 0] = 1.0


# ----------------------------------------------------------------------------- listing


def test_list_episodes_from_list_file(synthetic_dataset: Path, synthetic_episodes: list[Path]) -> None:
    assert list_episodes("episodes.txt", synthetic_dataset) == sorted(synthetic_episodes)
    # an absolute list path works too; its relative lines still resolve against root
    assert list_episodes(str(synthetic_dataset / "episodes.txt"), synthetic_dataset) == sorted(synthetic_episodes)


def test_list_episodes_list_file_format(
    tmp_path: Path, synthetic_dataset: Path, synthetic_episodes: list[Path]
) -> None:
    rel = [str(p.relative_to(synthetic_dataset)) for p in synthetic_episodes]
    text = f"# my episodes\n\n{rel[1]}\n  {synthetic_episodes[0]}  \n{rel[1]}/\n# {rel[2]}\n"
    (tmp_path / "list.txt").write_text(text)
    assert list_episodes(str(tmp_path / "list.txt"), synthetic_dataset) == sorted(synthetic_episodes[:2])


def test_list_episodes_bom_columns_and_duplicates(
    tmp_path: Path, synthetic_dataset: Path, synthetic_episodes: list[Path]
) -> None:
    """A list written by another tool: a byte-order mark, columns after the path, the same episode under
    another spelling and through a symlink -- each episode comes out once."""
    rel = [str(p.relative_to(synthetic_dataset)) for p in synthetic_episodes]
    link = tmp_path / "linked"
    link.symlink_to(synthetic_episodes[0], target_is_directory=True)
    text = f"{rel[0]}\t312\tpick up the block\n\n{rel[1]}  120\n./{rel[0]}\n{link}\n{rel[1]}//\n"
    (tmp_path / "list.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert list_episodes(str(tmp_path / "list.txt"), synthetic_dataset) == sorted(synthetic_episodes[:2])


def test_list_episodes_from_globs(synthetic_dataset: Path, synthetic_episodes: list[Path]) -> None:
    expected = sorted(synthetic_episodes)
    assert list_episodes("*/success/*/*", synthetic_dataset) == expected
    assert list_episodes("**/trajectory.h5", synthetic_dataset) == expected
    assert list_episodes("**/metadata_*.json", synthetic_dataset) == expected
    assert list_episodes(str(synthetic_dataset / "*" / "success" / "*" / "*"), "/elsewhere") == expected


def test_list_episodes_glob_skips_other_files(tmp_path: Path, synthetic_dataset: Path) -> None:
    folders = list_episodes("*/success/*/*", synthetic_dataset)
    root = tmp_path / "data"
    for folder in folders:
        (root / folder.relative_to(synthetic_dataset)).mkdir(parents=True)
    (root / "notes.txt").write_text("not an episode")
    (root / folders[0].relative_to(synthetic_dataset).parent / "README").write_text("nor this")
    (root / folders[0].relative_to(synthetic_dataset).parent / ".hidden.partial").mkdir()
    expected = [root / f.relative_to(synthetic_dataset) for f in folders]
    assert list_episodes("*/success/*/*", root) == expected
    assert list_episodes("**/*", root) != expected  # a folder glob takes every folder it matches


def test_list_episodes_nothing_found(synthetic_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"missing\.txt"):
        list_episodes("missing.txt", synthetic_dataset)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no episodes"):
        list_episodes("empty.txt", tmp_path)


# ----------------------------------------------------------------------------- decoding


def _pyav_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_decode_frames(synthetic_episodes: list[Path]) -> None:
    episode = open_episode(synthetic_episodes[2])
    indices = frame_grid(episode.num_usable, frame_stride(episode.video_fps, 4), 1)
    frames = decode_frames(episode, indices, num_threads=1)
    assert frames.shape == (len(indices), 48, 64, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames, _pyav_frames(episode.video_path)[indices])  # decord == PyAV
    assert decode_frames(episode, np.zeros(0, dtype=np.int64)).shape == (0, 48, 64, 3)


def test_iter_frames_equals_decode_frames(synthetic_episodes: list[Path]) -> None:
    episode = open_episode(synthetic_episodes[0], camera_key="wrist_mp4_path")
    indices = np.array([5, 0, 17, 17, 3, episode.num_usable - 1, 40])
    batches = list(iter_frames(episode, indices, batch=3))
    assert [len(b) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), decode_frames(episode, indices))


def test_decode_rejects_bad_indices(synthetic_episodes: list[Path]) -> None:
    episode = open_episode(synthetic_episodes[2])  # num_usable == rows - 1
    for bad in ([episode.num_usable], [-1], [[0, 1]], [0.5]):
        with pytest.raises(ValueError):
            decode_frames(episode, np.array(bad))


# ----------------------------------------------------------------------------- bad inputs

CopyEpisode = Callable[[int], Path]


def _error(folder: Path, camera_key: str = "left_mp4_path") -> EpisodeError:
    with pytest.raises(EpisodeError) as info:
        open_episode(folder, camera_key)
    error = info.value
    assert error.path == str(folder)
    assert str(error) == f"{folder}: {error.reason}"
    return error


def _rewrite(folder: Path, key: str, values: np.ndarray) -> None:
    with h5py.File(folder / "trajectory.h5", "r+") as f:
        del f[key]
        f[key] = values


def test_episode_error_pickles() -> None:
    error = pickle.loads(pickle.dumps(EpisodeError("/a/b", "went wrong")))
    assert (error.path, error.reason, str(error)) == ("/a/b", "went wrong", "/a/b: went wrong")


def test_missing_folder(tmp_path: Path) -> None:
    assert "does not exist" in _error(tmp_path / "nope").reason


def test_missing_metadata(copy_episode: CopyEpisode) -> None:
    folder = copy_episode(0)
    next(folder.glob("metadata_*.json")).unlink()
    assert "no metadata_*.json" in _error(folder).reason


def test_several_metadata(copy_episode: CopyEpisode) -> None:
    folder = copy_episode(0)
    (folder / "metadata_extra.json").write_text("{}")
    assert "several metadata files" in _error(folder).reason


def test_invalid_metadata_json(copy_episode: CopyEpisode) -> None:
    folder = copy_episode(0)
    next(folder.glob("metadata_*.json")).write_text("{not json")
    assert "not readable JSON" in _error(folder).reason


def test_metadata_without_camera_key(copy_episode: CopyEpisode) -> None:
    folder = copy_episode(0)
    path = next(folder.glob("metadata_*.json"))
    meta = json.loads(path.read_text())
    del meta["left_mp4_path"]
    path.write_text(json.dumps(meta))
    reason = _error(folder).reason
    assert "'left_mp4_path'" in reason and path.name in reason


def test_missing_mp4(copy_episode: CopyEpisode) -> None:
    folder = copy_episode(0)
    serial = _metadata(folder)["ext1_cam_serial"]
    (folder / "recordings" / "MP4" / f"{serial}.mp4").unlink()
    reason = _error(folder).reason
    assert f"recordings/MP4/{serial}.mp4" in reason and "missing" in reason


def test_truncated_mp4(copy_episode: CopyEpisode) -> None:
    folder = copy_episode(0)
    video = folder / "recordings" / "MP4" / f"{_metadata(folder)['ext1_cam_serial']}.mp4"
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    reason = _error(folder).reason
    assert "decord cannot open" in reason and video.name in reason


def test_garbage_mp4(copy_episode: CopyEpisode) -> None:
    folder = copy_episode(0)
    video = folder / "recordings" / "MP4" / f"{_metadata(folder)['wrist_cam_serial']}.mp4"
    video.write_bytes(np.random.default_rng(0).bytes(5000))
    assert "decord cannot open" in _error(folder, "wrist_mp4_path").reason


def test_corrupt_video_data_fails_on_decode(copy_episode: CopyEpisode) -> None:
    folder = copy_episode(0)
    episode = open_episode(folder)
    data = bytearray(episode.video_path.read_bytes())
    mdat, moov = data.find(b"mdat"), data.find(b"moov")
    assert 0 < mdat < moov  # PyAV writes the frame data first and the index (moov) at the end
    start, stop = (mdat + moov) // 2, moov - 16  # the later frames: frame 0 still decodes
    data[start:stop] = bytes(stop - start)
    episode.video_path.write_bytes(bytes(data))
    reopened = open_episode(folder)  # opening does not decode
    with pytest.raises(EpisodeError) as info:
        decode_frames(reopened, np.arange(reopened.num_usable))
    assert info.value.path == str(folder) and "decord failed to decode" in info.value.reason
    assert episode.video_path.name in info.value.reason


def test_missing_h5(copy_episode: CopyEpisode) -> None:
    folder = copy_episode(0)
    (folder / "trajectory.h5").unlink()
    assert "trajectory.h5 is missing" in _error(folder).reason


def test_garbage_h5(copy_episode: CopyEpisode) -> None:
    folder = copy_episode(0)
    (folder / "trajectory.h5").write_bytes(b"not an hdf5 file" * 100)
    assert "cannot be read as HDF5" in _error(folder).reason


def test_h5_without_cartesian_position(copy_episode: CopyEpisode) -> None:
    folder = copy_episode(0)
    with h5py.File(folder / "trajectory.h5", "r+") as f:
        del f[CARTESIAN_KEY]
    assert f"no dataset {CARTESIAN_KEY}" in _error(folder).reason


def test_h5_wrong_shape(copy_episode: CopyEpisode) -> None:
    folder = copy_episode(0)
    states = _h5_states(folder)
    _rewrite(folder, CARTESIAN_KEY, states[:, :5])
    reason = _error(folder).reason
    assert CARTESIAN_KEY in reason and "expected [N, 6]" in reason


def test_nan_in_states(copy_episode: CopyEpisode) -> None:
    folder = copy_episode(0)
    cartesian = _h5_states(folder)[:, :6]
    cartesian[7, 2] = np.nan
    cartesian[9, 0] = np.nan
    _rewrite(folder, CARTESIAN_KEY, cartesian)
    reason = _error(folder).reason
    assert CARTESIAN_KEY in reason and "first at row 7" in reason and "2 rows" in reason


def test_inf_in_gripper(copy_episode: CopyEpisode) -> None:
    folder = copy_episode(1)
    gripper = _h5_states(folder)[:, 6]
    gripper[3] = np.inf
    _rewrite(folder, GRIPPER_KEY, gripper)
    reason = _error(folder).reason
    assert GRIPPER_KEY in reason and "first at row 3" in reason


def test_integer_states_fail_naming_the_dataset(copy_episode: CopyEpisode) -> None:
    folder = copy_episode(0)
    _rewrite(folder, CARTESIAN_KEY, (_h5_states(folder)[:, :6] * 1000).astype(np.int64))
    reason = _error(folder).reason
    assert CARTESIAN_KEY in reason and "int64" in reason


@pytest.mark.parametrize(("key", "column", "value", "what"), [
    (CARTESIAN_KEY, 0, 250.0, "xyz"), (CARTESIAN_KEY, 4, 40.0, "Euler"), (GRIPPER_KEY, None, 7.0, GRIPPER_KEY)])
def test_absurd_states_fail_naming_the_dataset(copy_episode: CopyEpisode, key: str, column: int | None,
                                               value: float, what: str) -> None:
    folder = copy_episode(1)
    states = _h5_states(folder)
    values = states[:, :6] if key == CARTESIAN_KEY else states[:, 6]
    if column is None:
        values[5] = value
    else:
        values[5, column] = value
    _rewrite(folder, key, values)
    reason = _error(folder).reason
    assert what in reason and "plausible bound" in reason and "first at row 5" in reason


def test_video_shorter_than_rows_by_two(copy_episode: CopyEpisode) -> None:
    folder = copy_episode(2)  # its video already has one frame fewer than rows; add one more row
    states = _h5_states(folder)
    longer = np.concatenate([states, states[-1:]])
    _rewrite(folder, CARTESIAN_KEY, longer[:, :6])
    _rewrite(folder, GRIPPER_KEY, longer[:, 6])
    rows = len(longer)
    reason = _error(folder).reason
    assert f"has {rows - 2} frames" in reason and f"has {rows} rows" in reason


def test_video_longer_than_rows(copy_episode: CopyEpisode) -> None:
    folder = copy_episode(0)
    states = _h5_states(folder)[:-1]
    _rewrite(folder, CARTESIAN_KEY, states[:, :6])
    _rewrite(folder, GRIPPER_KEY, states[:, 6])
    assert f"{len(states) + 1} frames but trajectory.h5 has {len(states)} rows" in _error(folder).reason


def test_row_count_mismatch_between_datasets(copy_episode: CopyEpisode) -> None:
    folder = copy_episode(0)
    _rewrite(folder, GRIPPER_KEY, _h5_states(folder)[:-3, 6])
    assert "expected the same" in _error(folder).reason
