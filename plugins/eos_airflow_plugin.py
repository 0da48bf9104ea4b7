"""Drop this file into ``$AIRFLOW_HOME/plugins`` when eos-airflow is on the Python path but
not installed as a distribution (installed, it registers its plugin as a provider, and this
file is not needed). It only exposes the package's plugin to Airflow's plugin manager.
"""

from eos_airflow.plugin import EosAirflowPlugin

__all__ = ["EosAirflowPlugin"]
