"""Video (mp4, GIF) and subject-image I/O: round trips, alpha / grayscale handling, fitting."""
import numpy as np
import pytest
from PIL import Image

from idcrafter_jax import video

# imageio-ffmpeg runs the ffmpeg binary through subprocess (fork + exec at once), which JAX's
# fork warning does not concern.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")


def _gradient_video(t=9, h=32, w=48):
  """Smooth frames (H.264 and GIF palettes reproduce them closely)."""
  tt = np.linspace(0, 1, t)[:, None, None, None]
  yy = np.linspace(0, 1, h)[None, :, None, None]
  xx = np.linspace(0, 1, w)[None, None, :, None]
  ones = np.ones((t, h, w, 1))
  return (255 * np.concatenate([tt * ones, yy * ones, xx * ones], -1)).round().astype(np.uint8)


def test_mp4_round_trip_keeps_shape_fps_and_content(tmp_path):
  frames = _gradient_video()
  path = str(tmp_path / "clip.mp4")
  video.write_video(path, frames, fps=12)
  got, fps = video.read_video(path)
  assert got.shape == frames.shape and got.dtype == np.uint8
  assert fps == pytest.approx(12.0)
  assert np.abs(got.astype(int) - frames).mean() < 4.0  # lossy H.264 / yuv420p


def test_mp4_read_with_stride_and_max_frames(tmp_path):
  frames = _gradient_video()
  path = str(tmp_path / "clip.mp4")
  video.write_video(path, frames, fps=12)
  got, fps = video.read_video(path, max_frames=3, stride=2)
  full, _ = video.read_video(path)
  assert got.shape == (3,) + frames.shape[1:]
  np.testing.assert_array_equal(got, full[0:6:2])
  assert fps == pytest.approx(6.0)


def test_float_video_is_written_through_to_uint8(tmp_path):
  frames = _gradient_video()
  path = str(tmp_path / "clip.gif")
  video.write_video(path, video.to_model(frames), fps=10)
  got, fps = video.read_video(path)
  assert got.shape == frames.shape and fps == pytest.approx(10.0)
  assert np.abs(got.astype(int) - frames).mean() < 4.0  # 256-colour palette


def test_to_model_and_to_uint8_are_inverse_on_uint8():
  x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
  m = video.to_model(x)
  assert m.dtype == np.float32 and m.min() == -1.0 and m.max() == 1.0
  np.testing.assert_array_equal(video.to_uint8(m), x)
  np.testing.assert_array_equal(video.to_uint8(np.array([-3.0, 3.0])), [0, 255])


def test_rgba_image_is_composited_on_white(tmp_path):
  rgba = np.zeros((8, 8, 4), np.uint8)
  rgba[..., 0] = 200  # red-ish everywhere
  rgba[:, :4, 3] = 0  # left half transparent
  rgba[:, 4:6, 3] = 255  # opaque
  rgba[:, 6:, 3] = 128  # half
  path = str(tmp_path / "subject.png")
  Image.fromarray(rgba, "RGBA").save(path)
  got = video.read_image(path)
  assert got.shape == (8, 8, 3) and got.dtype == np.uint8
  np.testing.assert_array_equal(got[:, :4], 255)
  np.testing.assert_array_equal(got[:, 4:6], np.broadcast_to([200, 0, 0], (8, 2, 3)))
  expected_half = np.round(np.array([200, 0, 0]) * 128 / 255 + 255 * (1 - 128 / 255))
  np.testing.assert_allclose(got[:, 6:], np.broadcast_to(expected_half, (8, 2, 3)), atol=1)
  black = video.read_image(path, background=(0, 0, 0))
  np.testing.assert_array_equal(black[:, :4], 0)


def test_grayscale_and_palette_images_become_rgb(tmp_path):
  gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
  Image.fromarray(gray, "L").save(tmp_path / "g.png")
  got = video.read_image(str(tmp_path / "g.png"))
  assert got.shape == (8, 8, 3)
  np.testing.assert_array_equal(got, np.repeat(gray[..., None], 3, -1))
  Image.fromarray(gray, "L").convert("P").save(tmp_path / "p.gif")
  assert video.read_image(str(tmp_path / "p.gif")).shape == (8, 8, 3)


def test_fit_modes_give_the_requested_size_and_layout():
  img = np.zeros((20, 40, 3), np.uint8)
  img[..., 1] = 255  # green, wide
  padded = video.fit_image(img, (40, 40), "pad")
  assert padded.shape == (40, 40, 3)
  np.testing.assert_array_equal(padded[:9], 255)  # white bars above and below
  np.testing.assert_array_equal(padded[31:], 255)
  np.testing.assert_array_equal(padded[12:28, :, 1], 255)
  assert padded[12:28, :, 0].max() <= 2
  cropped = video.fit_image(img, (32, 32), "crop")
  assert cropped.shape == (32, 32, 3)
  assert cropped[..., 1].min() >= 253 and cropped[..., 0].max() <= 2  # all image, no background
  stretched = video.fit_image(img, (10, 30), "resize")
  assert stretched.shape == (10, 30, 3)


def test_crop_keeps_the_centre():
  img = np.zeros((10, 30, 3), np.uint8)
  img[:, 10:20] = 255  # white centre third
  got = video.fit_image(img, (10, 10), "crop")
  assert got.min() >= 250


def test_read_image_fits_to_size(tmp_path):
  Image.fromarray(np.full((30, 50, 3), 90, np.uint8)).save(tmp_path / "a.jpg")
  got = video.read_image(str(tmp_path / "a.jpg"), size=(16, 24), mode="pad")
  assert got.shape == (16, 24, 3)


def test_resize_video_fits_every_frame():
  frames = _gradient_video(t=3, h=32, w=48)
  assert video.resize_video(frames, (16, 16), "crop").shape == (3, 16, 16, 3)


@pytest.mark.parametrize("reader", [video.read_video, video.read_image])
def test_missing_empty_and_garbage_files_raise(tmp_path, reader):
  with pytest.raises(FileNotFoundError, match="no such file"):
    reader(str(tmp_path / "absent.mp4"))
  (tmp_path / "empty.mp4").write_bytes(b"")
  with pytest.raises(ValueError, match="empty"):
    reader(str(tmp_path / "empty.mp4"))
  (tmp_path / "junk.png").write_bytes(b"not an image or a video" * 8)
  with pytest.raises(ValueError, match="could not be read"):
    reader(str(tmp_path / "junk.png"))
  with pytest.raises(ValueError, match="directory"):
    reader(str(tmp_path))


def test_bad_arguments_raise(tmp_path):
  frames = _gradient_video(t=2)
  with pytest.raises(ValueError, match="extension"):
    video.write_video(str(tmp_path / "a.avi"), frames)
  with pytest.raises(ValueError, match="even height and width"):
    video.write_video(str(tmp_path / "a.mp4"), frames[:, :31])
  with pytest.raises(ValueError, match="\\(T, H, W, 3\\)"):
    video.write_video(str(tmp_path / "a.mp4"), frames[0])
  with pytest.raises(ValueError, match="fps"):
    video.write_video(str(tmp_path / "a.gif"), frames, fps=0)
  with pytest.raises(ValueError, match="fit mode"):
    video.fit_image(frames[0], (8, 8), "squash")
  with pytest.raises(ValueError, match="uint8"):
    video.to_model(frames.astype(np.float32))
