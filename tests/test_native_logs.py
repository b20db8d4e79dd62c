"""The detectors' native log lines (mediapipe's absl, TensorFlow Lite) stay out of the terminal;
`vsam -v` brings them back; vsam's own output stays."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fixture_set
from pose_prep.native_logs import NOISE, drop_noise

VSAM = str(Path(sys.executable).with_name("vsam"))
# Lines mediapipe 0.10.21 writes on every run, in every process that builds BlazePose (measured).
KNOWN = ("Created TensorFlow Lite XNNPACK delegate", "absl::InitializeLog", "inference_feedback_manager.cc",
         "landmark_projection_calculator.cc")
# Three photos with people and one without (YOLO runs on that one under auto).
PHOTOS = [f"coco-{number:012d}.jpg" for number in (234748, 790, 397133, 62554)]


def native_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(known in line for known in KNOWN)]


def without_verbose_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "VSAM_VERBOSE"}


def prep_pose(tmp_path: Path, name: str, *options: str, verbose: bool = False) -> subprocess.CompletedProcess:
    images = fixture_set.copy_photos(tmp_path / "img", PHOTOS)
    return subprocess.run([VSAM, *(["-v"] if verbose else []), "prep-pose", "--images", str(images),
                           "--out", str(tmp_path / name), *options],
                          capture_output=True, text=True, timeout=300, env=without_verbose_env())


def test_prep_pose_shows_no_native_log_lines_with_one_job_or_two_and_keeps_its_own_output(tmp_path):
    for jobs, detector in (("1", "auto"), ("2", "blazepose")):      # auto: BlazePose, and YOLO on the 4th
        done = prep_pose(tmp_path, f"jobs{jobs}", "--jobs", jobs, "--detector", detector, "--progress")
        assert done.returncode == 0, done.stderr
        assert native_lines(done.stderr) == [], (jobs, done.stderr)
        assert "prep-pose: 100%" in done.stderr and "4/4" in done.stderr       # the progress bar stays
        assert "prep-pose: 4 new" in done.stdout                                # and the summary


def test_verbose_lets_the_native_log_lines_through(tmp_path):
    done = prep_pose(tmp_path, "verbose", "--jobs", "1", "--detector", "blazepose", "--no-progress", verbose=True)
    assert done.returncode == 0, done.stderr
    assert "Created TensorFlow Lite XNNPACK delegate" in done.stderr and "inference_feedback_manager.cc" in done.stderr


def test_inside_the_block_native_lines_are_dropped_and_everything_else_comes_out_after_it():
    script = r"""
import os, sys
from pose_prep.native_logs import quiet_native_logs
print("before", file=sys.stderr, flush=True)
with quiet_native_logs():
    os.write(2, b"W0000 00:00:1796142616.118999   10520 inference_feedback_manager.cc:114] Feedback manager\n")
    os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
    os.write(2, b"E0000 00:00:1796142616.118999   10520 calculator_graph.cc:887] a real error\n")
    with quiet_native_logs():                                  # nested: one redirection
        print("python, meanwhile", file=sys.stderr)
print("after", file=sys.stderr, flush=True)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env=without_verbose_env())
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["before", "E0000 00:00:1796142616.118999   10520 calculator_graph.cc:887] "
                                        "a real error", "python, meanwhile", "after"]


def test_only_absl_info_and_warning_lines_and_tflite_info_lines_are_noise():
    noise = [b"I0000 00:00:1796142616.118999   10520 gl_context.cc:357] GL version: 3.2\n",
             b"W0000 00:00:1796142616.276126   10521 inference_feedback_manager.cc:114] Feedback manager ...\n",
             b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n",
             b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"]
    kept = [b"E0000 00:00:1796142616.118999   10520 calculator_graph.cc:887] a real error\n",
            b"INFO:root:a Python logging line\n", b"WARNING: vsam's own warning\n",
            b"prep-pose:  50%|#####     | 2/4\r", b"W0000 is how this sentence starts\n"]
    assert all(NOISE.match(line) for line in noise) and not any(NOISE.match(line) for line in kept)
    assert drop_noise(b"".join(noise[:2] + kept + noise[2:])) == b"".join(kept)
