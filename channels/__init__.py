"""Channel adapters (WhatsApp, VAPI voice): OpenAI clients of the gateway over HTTP; they import only ``core``."""
