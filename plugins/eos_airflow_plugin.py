"""Drop this file into ``$AIRFLOW_HOME/plugins`` when eos-airflow is on the Python path but
not installed as a distribution (installed, it registers itself as a provider, and this file
is not needed). It only makes the package's names known to Airflow's plugin manager.
"""

from airflow.plugins_manager import AirflowPlugin


class EosAirflowPlugin(AirflowPlugin):
    name = "eos_airflow"
