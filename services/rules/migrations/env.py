from loyalty.runtime.db import run_migrations_online
from services.rules.store import Base

run_migrations_online(Base.metadata)
