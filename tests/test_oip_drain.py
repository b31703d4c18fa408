"""The gRPC server's life in ``python -m service``. SIGTERM drains the gRPC port as it drains HTTP:
with 16 Open Inference Protocol calls in flight, each is answered, a new call (on a new channel or the
open one) gets UNAVAILABLE, and the process exits 0. A GRPC_PORT that is taken, or the same as PORT,
stops the start."""

from __future__ import annotations

import asyncio
import signal

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aio_grpcclient

from contract.photos import encode, make_photo
from service.config import ConfigError, load_settings
from tests.live_server import ServiceProcess, free_socket, wait_ready

pytestmark = pytest.mark.slow

MODEL = "mobilenet_v2"
IN_FLIGHT = 16


def image_input(data: bytes) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("image", [1], "BYTES")
    return tensor.set_data_from_numpy(np.array([data], dtype=np.object_))


def test_sigterm_answers_the_calls_in_flight_refuses_new_ones_and_exits_0(fake_repo, tmp_path):
    # A large PNG takes 70-200 ms to decode on a small box: 16 of them keep the inference threads
    # busy for a second or more after the first answer.
    heavy = encode(make_photo(2000, 1500, seed=7), "PNG")
    service = ServiceProcess(
        {"MODEL_REPOSITORY": str(fake_repo), "BACKEND": "onnxruntime-cpu", "LOG_LEVEL": "INFO"},
        tmp_path / "service.log",
    )
    try:
        wait_ready(service.url, timeout_s=60)

        async def load_then_sigterm():
            async with aio_grpcclient.InferenceServerClient(service.grpc_url) as client:
                assert await client.is_server_ready()
                calls = [
                    asyncio.ensure_future(client.infer(MODEL, [image_input(heavy)], client_timeout=60))
                    for _ in range(IN_FLIGHT)
                ]
                # Every call has reached the server (admitted: answered or in progress), which is mid-load.
                # (A first answer alone does not say so: on a busy machine the last calls may still be
                # on their way, and a call that arrives after SIGTERM is refused, not answered.)
                async with httpx.AsyncClient(base_url=service.url) as http:
                    while True:
                        entry = (await http.get(f"/models/{MODEL}")).json()
                        answered = sum(call.done() for call in calls)
                        if answered and answered + entry["batching"]["in_progress"] >= IN_FLIGHT:
                            break
                        await asyncio.sleep(0.005)
                service.process.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)  # uvicorn notices the signal within its 0.1 s tick
                refusals = []
                with pytest.raises(aio_grpcclient.InferenceServerException) as on_the_open_channel:
                    await client.infer(MODEL, [image_input(heavy)], client_timeout=10)
                refusals.append(on_the_open_channel.value.status())
                async with aio_grpcclient.InferenceServerClient(service.grpc_url) as fresh:
                    with pytest.raises(aio_grpcclient.InferenceServerException) as on_a_new_channel:
                        await fresh.infer(MODEL, [image_input(heavy)], client_timeout=10)
                refusals.append(on_a_new_channel.value.status())
                still_running = sum(not call.done() for call in calls)
                outcomes = await asyncio.gather(*calls, return_exceptions=True)
                return outcomes, refusals, still_running

        outcomes, refusals, still_running = asyncio.run(load_then_sigterm())
        code = service.wait(30)
    finally:
        service.stop()
    log = service.output()
    failed = [o for o in outcomes if not isinstance(o, aio_grpcclient.InferResult)]
    assert not failed, (failed, log[-3000:])
    assert all(o.as_numpy("logits").shape == (1, 1000) for o in outcomes)
    assert still_running > 0, "the load ended before the refusals were checked: the test proved nothing"
    assert refusals == ["StatusCode.UNAVAILABLE"] * 2, refusals
    assert code == 0, log[-3000:]
    assert "shutdown complete" in log


def test_a_grpc_port_that_is_taken_fails_the_start_with_exit_3(fake_repo, tmp_path):
    with free_socket() as taken:
        taken.listen()
        port = taken.getsockname()[1]
        service = ServiceProcess(
            {"MODEL_REPOSITORY": str(fake_repo), "BACKEND": "onnxruntime-cpu", "GRPC_PORT": str(port)},
            tmp_path / "service.log",
        )
        try:
            code = service.wait(60)
        finally:
            service.stop()
    assert code == 3, service.output()[-3000:]
    assert "GRPC_PORT" in service.output()


def test_grpc_port_must_differ_from_port_and_metrics_port():
    for clash in ({"port": 8001}, {"metrics_port": 8001}):
        with pytest.raises(ConfigError, match="GRPC_PORT"):
            load_settings(grpc_port=8001, **clash)
    assert load_settings(grpc_port=0, port=0).grpc_port == 0  # both chosen by the system
