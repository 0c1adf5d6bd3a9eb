from loyalty.runtime.db import run_migrations_online
from services.rewards.store import Base

run_migrations_online(Base.metadata)
