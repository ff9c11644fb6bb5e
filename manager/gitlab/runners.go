package gitlab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// registrationInfo is the info sent at registration: the client's info
// without executor and shell and with only the network-level features, as
// the official runner sends it.
func (c *Client) registrationInfo() runnerapi.VersionInfo {
	info := c.info
	info.Executor, info.Shell = "", ""
	f := info.Features
	info.Features = runnerapi.FeaturesInfo{
		TraceReset:    f.TraceReset,
		TraceChecksum: f.TraceChecksum,
		TraceSize:     f.TraceSize,
		Cancelable:    f.Cancelable,
	}
	return info
}

// Register calls POST /runners with a registration token and returns the
// runner authentication token GitLab created. A zero req.Info is replaced by
// the client's info reduced as the official runner does at registration.
// 403 returns an error wrapping ErrForbidden.
func (c *Client) Register(ctx context.Context, req runnerapi.RegisterRunnerRequest) (*runnerapi.RegisterRunnerResponse, error) {
	if req.Token == "" {
		return nil, errors.New("register runner: token (registration token) is empty")
	}
	if req.Info == (runnerapi.VersionInfo{}) {
		req.Info = c.registrationInfo()
	}
	body, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("register runner: encode: %w", err)
	}
	runner := ShortToken(req.Token)
	resp, err := c.do(ctx, call{
		endpoint: EndpointRegisterRunner, method: http.MethodPost, path: "runners",
		runner: runner, backoffKey: runnerBackoffKey(http.MethodPost, "runners", req.Token),
		body: body, contentType: "application/json", accept: true,
	})
	if err != nil {
		return nil, fmt.Errorf("register runner: %w", err)
	}
	switch resp.status {
	case http.StatusCreated:
		if !isJSON(resp.header) {
			return nil, fmt.Errorf("register runner: server should return application/json, got %q", resp.header.Get("Content-Type"))
		}
		var out runnerapi.RegisterRunnerResponse
		if err := json.Unmarshal(resp.body, &out); err != nil {
			return nil, fmt.Errorf("register runner: decode response: %w", err)
		}
		if out.Token == "" {
			return nil, errors.New("register runner: response has an empty token")
		}
		c.log.Info("runner registered", "runner", ShortToken(out.Token))
		return &out, nil
	case http.StatusForbidden:
		return nil, fmt.Errorf("register runner: %w (check registration token)", ErrForbidden)
	default:
		return nil, fmt.Errorf("register runner: unexpected status %d", resp.status)
	}
}

// Verify calls POST /runners/verify and reports whether GitLab still knows the
// runner token: false only on 403 ("removed"). Like the official runner it
// treats any other status as alive (logged); a transport error is returned
// together with alive = true.
func (c *Client) Verify(ctx context.Context, token string) (alive bool, err error) {
	if token == "" {
		return false, errors.New("verify runner: token is empty")
	}
	body, err := json.Marshal(runnerapi.RunnerTokenRequest{Token: token})
	if err != nil {
		return false, fmt.Errorf("verify runner: encode: %w", err)
	}
	runner := ShortToken(token)
	resp, err := c.do(ctx, call{
		endpoint: EndpointVerifyRunner, method: http.MethodPost, path: "runners/verify",
		runner: runner, backoffKey: runnerBackoffKey(http.MethodPost, "runners/verify", token),
		body: body, contentType: "application/json", lastUpdateToken: token,
	})
	if err != nil {
		return true, fmt.Errorf("verify runner %s: %w", runner, err)
	}
	switch resp.status {
	case http.StatusOK:
		return true, nil
	case http.StatusForbidden:
		return false, nil
	default:
		c.log.Warn("verify runner: unexpected status, treating runner as alive", "runner", runner, "status", resp.status)
		return true, nil
	}
}

// Unregister calls DELETE /runners with the runner token in a JSON body and
// expects 204. 403 returns an error wrapping ErrForbidden.
func (c *Client) Unregister(ctx context.Context, token string) error {
	if token == "" {
		return errors.New("unregister runner: token is empty")
	}
	body, err := json.Marshal(runnerapi.RunnerTokenRequest{Token: token})
	if err != nil {
		return fmt.Errorf("unregister runner: encode: %w", err)
	}
	runner := ShortToken(token)
	resp, err := c.do(ctx, call{
		endpoint: EndpointUnregisterRunner, method: http.MethodDelete, path: "runners",
		runner: runner, backoffKey: runnerBackoffKey(http.MethodDelete, "runners", token),
		body: body, contentType: "application/json",
	})
	if err != nil {
		return fmt.Errorf("unregister runner %s: %w", runner, err)
	}
	switch resp.status {
	case http.StatusNoContent:
		return nil
	case http.StatusForbidden:
		return fmt.Errorf("unregister runner %s: %w", runner, ErrForbidden)
	default:
		return fmt.Errorf("unregister runner %s: unexpected status %d", runner, resp.status)
	}
}
