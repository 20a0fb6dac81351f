"""Rewards without gradients: scorers by import path, and the remote reward against a stdlib server on 127.0.0.1
that answers, hangs, trickles, fails or answers garbage."""

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_dmdr.rewards import load_rewards, validate_reward_specs
from diffusers_dmdr.rewards.scores import (
    RemoteReward,
    RewardScoringError,
    ScoreReward,
    images_to_uint8,
    score_reward,
)


@score_reward
def mean_brightness(images, prompts):
    """A scorer of decoded images: mean pixel value in [0, 1] of each uint8 image."""
    return [float(np.asarray(image).mean() / 255.0) for image in images]


@score_reward(image_format="pil")
def image_width(images, prompts):
    return [float(image.width) for image in images]


def _images(batch_size: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch_size, 3, 8, 12, generator=torch.Generator().manual_seed(seed))


def test_score_reward_adapts_a_scorer_to_the_tensor_protocol():
    images = _images()
    reward = ScoreReward(mean_brightness)
    scores = reward(images, ["a", "b", "c"])
    expected = torch.stack([torch.from_numpy(a).float().mean() / 255 for a in images_to_uint8(images)])
    torch.testing.assert_close(scores, expected)
    assert scores.dtype == torch.float32 and not scores.requires_grad
    assert reward.differentiable is False
    assert ScoreReward(image_width)(images, ["a", "b", "c"]).tolist() == [12.0] * 3


def test_a_scorer_by_import_path_loads_without_the_gradient_probe_and_is_refused_for_backprop():
    spec = "test_rewards_scores.mean_brightness:2.0"
    validate_reward_specs([spec])
    (loaded,) = load_rewards([spec], "cpu", for_training=False)
    assert loaded.fn.differentiable is False and loaded.weight == 2.0
    images = _images()
    torch.testing.assert_close(loaded.fn(images, ["a"] * 3), ScoreReward(mean_brightness)(images, ["a"] * 3))
    with pytest.raises(ValueError, match="--rl grpo or --rl dpo"):
        load_rewards([spec], "cpu", for_training=True)


def test_a_scorer_that_returns_the_wrong_thing_fails_in_one_line():
    def wrong_count(images, prompts):
        return [0.0]

    def not_finite(images, prompts):
        return [float("nan")] * len(images)

    with pytest.raises(RewardScoringError, match="returned 1 scores for 3 images"):
        ScoreReward(wrong_count)(_images(), ["a"] * 3)
    with pytest.raises(RewardScoringError, match="not a finite number"):
        ScoreReward(not_finite)(_images(), ["a"] * 3)


# ----------------------------------------------------------------------------------------------------------------
# The remote reward against a local server
# ----------------------------------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass

    def do_POST(self):
        server = self.server
        server.requests += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.batch_sizes.append(len(body["images"]))
        server.authorization = self.headers.get("Authorization")
        mode = server.modes.pop(0) if len(server.modes) > 1 else server.modes[0]
        if mode == "hang":
            time.sleep(server.hang_seconds)
            return
        if mode == "trickle":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(40):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.1)
            return
        if mode in ("500", "400"):
            self.send_error(int(mode))
            return
        if mode == "garbage":
            answer = b"<html>not json</html>"
        elif mode == "wrong_count":
            answer = json.dumps({"scores": [1.0]}).encode()
        else:
            scores = []
            for encoded, prompt in zip(body["images"], body["prompts"], strict=True):
                image = np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))))
                scores.append(float(image.mean() / 255.0) + len(prompt))
            answer = json.dumps({"scores": scores} if mode == "ok" else scores).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.modes, httpd.requests, httpd.batch_sizes, httpd.hang_seconds = ["ok"], 0, [], 3.0
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/score"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _expected(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return torch.tensor([a.mean() / 255.0 + len(p) for a, p in zip(images_to_uint8(images), prompts, strict=True)])


def test_remote_reward_scores_in_batches(server):
    images, prompts = _images(5), ["a", "bb", "ccc", "d", "ee"]
    reward = RemoteReward(server.url, batch_size=2, timeout=5)
    scores = reward(images, prompts)
    torch.testing.assert_close(scores, _expected(images, prompts).float())
    assert server.batch_sizes == [2, 2, 1]
    server.modes = ["bare_list"]
    torch.testing.assert_close(reward(images, prompts), _expected(images, prompts).float())


def test_remote_reward_through_load_rewards_with_a_token_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("JUDGE_TOKEN", "secret-123")
    spec = f"remote:0.5:url={server.url}:timeout=5:api_key_env=JUDGE_TOKEN"
    (loaded,) = load_rewards([spec], "cpu", for_training=False)
    images = _images(2)
    torch.testing.assert_close(loaded.fn(images, ["a", "b"]), _expected(images, ["a", "b"]).float())
    assert server.authorization == "Bearer secret-123"
    assert "secret-123" not in loaded.spec.to_text()


def test_remote_reward_that_hangs_is_bounded_by_its_timeout(server):
    server.modes = ["hang"]
    reward = RemoteReward(server.url, timeout=0.5, max_retries=1, retry_wait=0.0)
    start = time.monotonic()
    with pytest.raises(RewardScoringError, match=r"no answer within 0.5 s \(2 attempts"):
        reward(_images(1), ["a"])
    assert time.monotonic() - start < 2.5
    assert server.requests == 2


def test_remote_reward_that_trickles_bytes_is_bounded_by_its_timeout(server):
    # The server sends a byte every 0.1 s for 4 s: every single read is fast, the answer never completes in time.
    server.modes = ["trickle"]
    reward = RemoteReward(server.url, timeout=0.8, max_retries=0)
    start = time.monotonic()
    with pytest.raises(RewardScoringError, match="within 0.8 s"):
        reward(_images(1), ["a"])
    assert time.monotonic() - start < 2.0


def test_remote_reward_retries_server_errors_then_succeeds(server):
    server.modes = ["500", "500", "ok"]
    reward = RemoteReward(server.url, timeout=5, max_retries=2, retry_wait=0.0)
    images = _images(2)
    torch.testing.assert_close(reward(images, ["a", "b"]), _expected(images, ["a", "b"]).float())
    assert server.requests == 3


def test_remote_reward_gives_up_after_bounded_retries(server):
    server.modes = ["500"]
    reward = RemoteReward(server.url, timeout=5, max_retries=2, retry_wait=0.0)
    with pytest.raises(RewardScoringError, match=r"HTTP 500 .*\(3 attempts"):
        reward(_images(1), ["a"])
    assert server.requests == 3


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("400", "HTTP 400"),
        ("garbage", "did not answer JSON"),
        ("wrong_count", "returned 1 scores for 2 images"),
    ],
)
def test_remote_reward_client_errors_and_garbage_fail_at_once(server, mode, message):
    server.modes = [mode]
    reward = RemoteReward(server.url, timeout=5, max_retries=3, retry_wait=0.0)
    with pytest.raises(RewardScoringError, match=message) as error:
        reward(_images(2), ["a", "b"])
    assert "\n" not in str(error.value)
    assert server.requests == 1


def test_remote_reward_that_is_not_running_fails_in_one_line():
    reward = RemoteReward("http://127.0.0.1:9/score", timeout=1, max_retries=1, retry_wait=0.0)
    with pytest.raises(RewardScoringError, match="127.0.0.1:9.*2 attempts") as error:
        reward(_images(1), ["a"])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("remote:1.0", "needs url="),
        ("remote:1.0:url=ftp://host/x", "needs url="),
        ("remote:1.0:url=http://127.0.0.1:8000/s:timeout=0", "timeout must be positive"),
        ("remote:1.0:url=http://127.0.0.1:8000/s:batch_size=0", "batch_size must be"),
        ("remote:1.0:url=http://127.0.0.1:8000/s:api_key_env=DMDR_NO_SUCH_VARIABLE", "not set"),
        ("remote:1.0:url=http://127.0.0.1:8000/s:retries=3", "Unknown option"),
    ],
)
def test_remote_reward_bad_options_fail_before_anything_loads(spec, message):
    with pytest.raises(ValueError, match=message):
        validate_reward_specs([spec])
