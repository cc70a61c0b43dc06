"""VAPI voice calls: the custom-LLM endpoint, the server URL, call records and outbound calls."""

from channels.vapi.channel import VapiChannel
from channels.vapi.config import VapiAccount, parse_accounts
from channels.vapi.deliverer import VapiDeliverer

__all__ = ["VapiAccount", "VapiChannel", "VapiDeliverer", "parse_accounts"]
