"""Human in the loop: how sure an agent turn is (``confidence``), the escalation queue with its
leases, priorities and live feed (``escalations``), SLA alerts (``sla``) and the learning loop
(``learning``). A domain package: it imports ``core`` and the runtime only; the gateway composes
it (gateway/hitl_stage.py on the request path, gateway/admin_escalations.py for people)."""
