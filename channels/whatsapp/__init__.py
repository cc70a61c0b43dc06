"""WhatsApp Business (Cloud API) as a channel of the gateway's agents.

``WhatsApp`` (channel.py) holds one process's part: the webhook (webhook.py), the queue worker
(worker.py), the sender (sender.py) and the deliverer (deliverer.py) over the accounts of the
config (channels/config.py).
"""

from channels.whatsapp.channel import WhatsApp

__all__ = ["WhatsApp"]
