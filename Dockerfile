# The official Apache Airflow image with eos-airflow installed (registers @task.exactly_once).
# Build: docker build -t eos-airflow:3.3.2 .   (docker-compose.yml builds it for you)
ARG AIRFLOW_VERSION=3.3.2
FROM apache/airflow:${AIRFLOW_VERSION}-python3.11
ARG AIRFLOW_VERSION
COPY --chown=airflow:root pyproject.toml README.md /opt/eos-airflow/
COPY --chown=airflow:root eos_airflow /opt/eos-airflow/eos_airflow
# Pin apache-airflow to the image's version so that installing the package never changes it.
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" /opt/eos-airflow
