"""Development tools around the ingestor runtime: the Stripe API emulator, a local Kafka broker, the demo.

Shipped with the source checkout only (``make setup`` installs it editable, next to ``ingestor``); neither
the wheel nor the production image contains it, and the runtime package ``ingestor`` never imports it
(an import-linter contract run by ``make lint`` checks this). ``ingestor emulator|kafka|demo`` import it
lazily.
"""
