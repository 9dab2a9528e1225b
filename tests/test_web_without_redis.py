"""The web app with its Redis gone: clear 503s, never a crash or a hang."""

from __future__ import annotations

from shared.redis_server import free_port
from web import create_app


def test_redis_down_gives_503_json():
    app = create_app({"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    client = app.test_client()
    response = client.post("/v1/transcriptions", data=b"RIFF0000WAVE", content_type="audio/wav")
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "service_unavailable"
    assert client.get("/v1/transcriptions/" + "a" * 32).status_code == 503
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["redis"] is False
    assert client.get("/healthz").status_code == 200
