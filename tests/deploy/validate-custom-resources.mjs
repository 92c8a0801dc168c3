// Reads a JSON array of Kubernetes objects on stdin and validates each custom resource against
// its CRD's OpenAPI schema (kubernetes-models, generated from the operators' own CRDs).
// Prints one JSON line per object: {kind, name, error} with error null when valid, or
// "no schema" for a kind it does not know.
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const models = {
  "keda.sh/v1alpha1 ScaledObject": ScaledObject,
  "monitoring.coreos.com/v1 ServiceMonitor": ServiceMonitor,
};
let input = "";
for await (const chunk of process.stdin) input += chunk;
for (const object of JSON.parse(input)) {
  const Model = models[`${object.apiVersion} ${object.kind}`];
  let error = Model ? null : "no schema";
  if (Model) {
    try {
      new Model(object).validate();
    } catch (e) {
      error = e.message;
    }
  }
  console.log(JSON.stringify({ kind: object.kind, name: object.metadata?.name, error }));
}
