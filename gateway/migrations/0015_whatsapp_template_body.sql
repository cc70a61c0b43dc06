-- A WhatsApp template's approved body text (optional, as written in Meta's WhatsApp Manager, with
-- its {{1}}, {{2}}... placeholders): Meta refuses a template whose body with its parameters filled
-- in runs past 1,024 characters (132005), so the gateway needs the body's own length to know how
-- much of an answer one window template can carry.
ALTER TABLE whatsapp_templates ADD COLUMN IF NOT EXISTS body text;
