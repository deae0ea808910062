"""The durable event bus: CloudEvents on partitioned logs, consumer groups, retries, DLQs."""

from shoal.events.bus import EventBus, Message, PublishAck, TopicInfo
from shoal.events.consumer import Subscription
from shoal.events.event import Event
from shoal.events.retry import Drop, RetryPolicy
from shoal.events.sync import SyncEventBus

__all__ = [
    "Drop",
    "Event",
    "EventBus",
    "Message",
    "PublishAck",
    "RetryPolicy",
    "Subscription",
    "SyncEventBus",
    "TopicInfo",
]
