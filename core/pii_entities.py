"""The entity types the gateway knows, and how each is named in config, Presidio and placeholders."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EntityType:
    name: str  # as written in config: "email"
    presidio: str  # Presidio's entity type: "EMAIL_ADDRESS"
    label: str  # in placeholders: "<EMAIL_1>"
    needs_ner: bool = False


BUILTIN: dict[str, EntityType] = {
    e.name: e
    for e in (
        EntityType("email", "EMAIL_ADDRESS", "EMAIL"),
        EntityType("phone", "PHONE_NUMBER", "PHONE"),
        EntityType("credit_card", "CREDIT_CARD", "CREDIT_CARD"),
        EntityType("iban", "IBAN_CODE", "IBAN"),
        EntityType("us_ssn", "US_SSN", "US_SSN"),
        EntityType("ip_address", "IP_ADDRESS", "IP_ADDRESS"),
        # Only with an NER model installed and configured (pii.ner_model).
        EntityType("person", "PERSON", "PERSON", needs_ner=True),
        EntityType("location", "LOCATION", "LOCATION", needs_ner=True),
    )
}

ACTIONS = ("redact", "mask", "hash", "block", "pseudonymize", "allow")


def custom_entity(name: str) -> EntityType:
    upper = name.upper()
    return EntityType(name, upper, upper)


def by_presidio(names: dict[str, EntityType]) -> dict[str, EntityType]:
    return {e.presidio: e for e in names.values()}
