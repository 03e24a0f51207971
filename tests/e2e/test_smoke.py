"""End-to-end smoke: one event from RabbitMQ reaches a subscribed websocket client."""

from support.answers import recv_json
from support.broker import unique


def test_public_event_reaches_subscriber(rango, publisher):
    market = unique()
    with rango.connect(query=f"stream={market}.trades") as ws:
        assert recv_json(ws) == {
            "success": {"message": "subscribed", "streams": [f"{market}.trades"]}
        }
        publisher.publish(f"public.{market}.trades", {"tid": 1})
        assert recv_json(ws) == {f"{market}.trades": {"tid": 1}}
